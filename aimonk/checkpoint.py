"""The self-describing checkpoint: its schema (``CheckpointMeta``), and saving and loading it.

A checkpoint is one ``torch.save`` file holding plain data only (it loads with ``weights_only=True``):
the weights under ``state_dict`` and every field of ``CheckpointMeta`` beside them.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from aimonk import __version__
from aimonk.files import CheckpointError, atomic_torch_save, safe_load
from aimonk.model import (
    BACKBONES,
    ProbeEnsemble,
    WeightsUnavailableError,
    feature_probe,
    make_architecture,
)

__all__ = ["CHECKPOINT_FORMAT", "SCHEMA_VERSION", "CheckpointError", "CheckpointMeta", "DECISIONS",
           "load_checkpoint", "safe_load", "save_checkpoint", "update_checkpoint"]

CHECKPOINT_FORMAT = "aimonk-checkpoint"  # the "format" field every checkpoint carries
SCHEMA_VERSION = 1  # bump when a field changes meaning; older aimonk refuses newer checkpoints
DECISIONS = ("threshold", "majority_present", "majority_absent")  # per-attribute decision rules
MAX_IMAGE_SIZE = 2048  # a larger input side is refused: it is a damaged field, not a model

REQUIRED_KEYS = ("backbone", "attributes", "image_size", "mean", "std", "thresholds", "state_dict")


@dataclass
class CheckpointMeta:
    """Everything a checkpoint says about its model except the weights."""

    backbone: str  # a key of model.BACKBONES
    attributes: list[str]  # output names, in column order
    image_size: int  # side of the square input, in pixels
    mean: list[float]  # input normalisation (per RGB channel)
    std: list[float]
    thresholds: list[float]  # per attribute, used where the decision is "threshold"
    decision: list[str] = field(default_factory=list)  # per attribute, one of DECISIONS ([] = all "threshold")
    tta: bool = False  # average over a horizontal flip at inference
    probe: dict | None = None  # the probe ensemble's C, backbones and validation AP, or None
    pos_weight: list[float] | None = None  # the loss's per-attribute positive weight
    precision: str = "fp32"  # the precision it was trained in
    config: dict = field(default_factory=dict)  # the TrainConfig, as a dict
    history: dict = field(default_factory=dict)  # loss per iteration, per-epoch figures
    split: dict | None = None  # the split file and the validation names
    validation_scores: dict | None = None  # out-of-fold validation probabilities (cross-fitted probe)
    data: dict | None = None  # the data folder, missing and unreadable images
    int8: dict | None = None  # activation calibration for int8 inference
    format: str = CHECKPOINT_FORMAT
    aimonk_version: str = __version__  # the aimonk that wrote it
    schema_version: int = SCHEMA_VERSION

    @property
    def decisions(self) -> list[str]:
        """The decision rule of every attribute (``"threshold"`` where the checkpoint names none)."""
        return list(self.decision) or ["threshold"] * len(self.attributes)

    def to_dict(self) -> dict:
        """Plain data, as stored in the file."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str | os.PathLike = "checkpoint") -> "CheckpointMeta":
        """Validate stored metadata; anything outside the schema raises one line naming ``source`` and the field."""
        if values.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{source}: not an aimonk checkpoint (train one with: python -m aimonk train --data DIR)")
        version = values.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise CheckpointError(f"{source}: schema version {version!r} is newer than this aimonk reads "
                                  f"({SCHEMA_VERSION}); upgrade aimonk")
        absent = [k for k in REQUIRED_KEYS if k not in values and k != "state_dict"]
        if absent:
            raise CheckpointError(f"{source}: checkpoint lacks {absent}")
        known = {f.name for f in fields(cls)}
        meta = cls(**{k: v for k, v in values.items() if k in known})
        for problem in meta._problems():
            raise CheckpointError(f"{source}: {problem}")
        return meta

    def _problems(self):
        """Each way this metadata breaks the schema, as a phrase naming the field."""
        n = len(self.attributes) if isinstance(self.attributes, list) else 0
        if not n or not all(isinstance(a, str) and a for a in self.attributes) or len(set(self.attributes)) != n:
            yield f"field 'attributes' must be a list of unique names, got {self.attributes!r:.100}"
        if self.backbone not in BACKBONES:
            yield f"unknown backbone {self.backbone!r}; this aimonk knows {sorted(BACKBONES)}"
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) \
                or not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            yield f"field 'image_size' must be an integer from 8 to {MAX_IMAGE_SIZE}, got {self.image_size!r:.40}"
        for name in ("mean", "std"):
            v = getattr(self, name)
            if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_finite(x) for x in v)):
                yield f"field {name!r} must be 3 finite numbers, got {v!r:.60}"
        if not isinstance(self.thresholds, list) or len(self.thresholds) != n:
            yield f"{len(self.thresholds) if isinstance(self.thresholds, list) else self.thresholds!r} thresholds for {n} attributes"
        elif not all(_finite(t) and 0 <= t <= 1 for t in self.thresholds):
            yield f"field 'thresholds' must hold numbers from 0 to 1, got {self.thresholds!r:.100}"
        if not isinstance(self.decision, list) or (self.decision and (
                len(self.decision) != n or any(d not in DECISIONS for d in self.decision))):
            yield f"field 'decision' must list one of {list(DECISIONS)} per attribute, got {self.decision!r:.100}"
        for name in ("probe", "split", "validation_scores", "data", "int8"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                yield f"field {name!r} must be a mapping or None, got {type(getattr(self, name)).__name__}"
        if not isinstance(self.tta, bool):
            yield f"field 'tta' must be true or false, got {self.tta!r:.40}"
        for name in ("config", "history"):
            if not isinstance(getattr(self, name), dict):
                yield f"field {name!r} must be a mapping, got {type(getattr(self, name)).__name__}"
        if self.pos_weight is not None and not (isinstance(self.pos_weight, list) and len(self.pos_weight) == n
                                                and all(_finite(w) for w in self.pos_weight)):
            yield f"field 'pos_weight' must be {n} finite numbers or None, got {self.pos_weight!r:.60}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: CheckpointMeta | Mapping[str, Any]) -> Path:
    """Write a self-describing checkpoint atomically (unique temp file, fsync, rename).

    Args:
        path: destination, e.g. ``models/model.pth``.
        model: the trained model (its weights are copied to the CPU).
        meta: a ``CheckpointMeta``; a plain mapping is written as given (it is validated when
            loaded), which is how tools and tests craft older or damaged checkpoints.
    Returns:
        The path written.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    values = meta.to_dict() if isinstance(meta, CheckpointMeta) else \
        {"format": CHECKPOINT_FORMAT, "aimonk_version": __version__, **meta}
    return atomic_torch_save({**values, "state_dict": state}, path)


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, CheckpointMeta]:
    """Load a checkpoint written by ``save_checkpoint`` safely (``weights_only=True``).

    Returns:
        ``(model, meta)``: the model in eval mode on the CPU, and its validated metadata.
    Raises:
        CheckpointError: naming the file, if it is missing, truncated, not a checkpoint, carries
            code (a malicious pickle is refused, never executed), breaks the schema or does not fit
            its architecture.
    """
    path = Path(path)
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not an aimonk checkpoint (train one with: python -m aimonk train --data DIR)")
    meta = CheckpointMeta.from_dict(obj, path)
    if not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path}: checkpoint lacks ['state_dict']")
    model = _architecture(meta, path)
    try:
        model.load_state_dict(obj["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()] or [type(e).__name__]
        detail = next((s for s in lines if s.startswith(("size mismatch", "Missing key", "Unexpected key"))), lines[0])
        raise CheckpointError(f"{path}: weights do not fit backbone {meta.backbone!r} with "
                              f"{len(meta.attributes)} attributes ({detail[:300]})") from None
    return model.eval(), meta


def _architecture(meta: CheckpointMeta, path: Path) -> nn.Module:
    """The untrained network that ``meta`` describes, probe ensemble included."""
    n = len(meta.attributes)
    try:
        model = make_architecture(meta.backbone, n)
        if meta.probe and meta.probe.get("backbones"):  # a probe on frozen networks' features
            return ProbeEnsemble(model, feature_probe(meta.probe["backbones"], n, weights=None))
        if meta.probe:  # checkpoints before probe_backbones: the probe is a second network of the same backbone
            return ProbeEnsemble(model, make_architecture(meta.backbone, n))
        return model
    except (WeightsUnavailableError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def update_checkpoint(path: str | os.PathLike, **changes) -> CheckpointMeta:
    """Rewrite some metadata (e.g. tuned ``thresholds``) of a checkpoint in place, atomically.

    Returns:
        The new metadata.
    Raises:
        CheckpointError: if a change breaks the schema (the file is left as it was).
    """
    model, meta = load_checkpoint(path)
    new = replace(meta, **changes, aimonk_version=__version__)
    new = CheckpointMeta.from_dict(new.to_dict(), path)
    save_checkpoint(path, model, new)
    return new
