"""The exported model file: the whole model a checkpoint describes as one ONNX graph, sealed with its
metadata, and read back only if nothing in it has changed since export.

The graph takes what ``aimonk.data.decode_uint8`` gives, a uint8 RGB batch (B, 3, S, S), and returns
the probabilities (B, n_attributes): the normalisation, the probe ensemble and the flip TTA are inside
it, so the file describes itself. Its ONNX ``metadata_props`` (keys ``aimonk.*``) hold the image size,
the normalisation, the attribute names, the decision rules and thresholds, the source checkpoint's
sha256, the aimonk version and the format version, plus two digests: one of the graph and one of the
metadata. A file whose graph or metadata was changed after export is refused.

The export uses ``torch.onnx.export`` (the ``torch.export``-based exporter, ``dynamo=True``); ONNX is
an optional extra (``pip install -e '.[deploy]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aimonk import __version__
from aimonk.checkpoint import CHECKPOINT_FORMAT, CheckpointMeta
from aimonk.files import CheckpointError, atomic_write_bytes
from aimonk.metrics import apply_decisions

ARTIFACT_FORMAT = "aimonk-onnx"  # the "aimonk.format" every exported file carries
ARTIFACT_SCHEMA_VERSION = 1  # bump when a metadata field changes meaning; older aimonk refuses newer files
INPUT_NAME = "images"  # uint8 (batch, 3, S, S), RGB, resized to S x S
OUTPUT_NAME = "probabilities"  # float32 (batch, n_attributes)
PREFIX = "aimonk."  # the prefix of aimonk's metadata keys
PRECISIONS = ("fp32", "int8")
REQUIRED = ("format", "schema_version", "aimonk_version", "checkpoint_sha256", "precision", "backbone", "attributes",
            "image_size", "mean", "std", "thresholds", "decisions", "tta", "probe", "input", "output",
            "graph_sha256", "metadata_sha256")
INPUT_TEXT = ("images: uint8 RGB, shape (batch, 3, S, S) with S = image_size, resized with bilinear "
              "antialiasing (aimonk.data.decode_uint8); the normalisation is inside the graph")
OUTPUT_TEXT = "probabilities: float32 sigmoid probabilities, shape (batch, n_attributes), in 'attributes' order"
DEPLOY_EXTRA = "pip install -e '.[deploy]'"
IR_SUFFIX = ".xml"  # an OpenVINO IR export: graph and rt_info in the .xml, weights in the .bin beside it
IR_WEIGHTS_KEY = "ir_weights_sha256"  # the sha256 of an IR export's .bin, in its rt_info


class ArtifactError(CheckpointError):
    """An exported model file is missing, damaged, altered or not from the checkpoint expected; the message names it."""


class DeployModel(nn.Module):
    """The model as exported: uint8 images in, probabilities out, preprocessing and flip TTA inside.

    Args:
        model: the checkpoint's network (a ``ProbeEnsemble`` included), in eval mode.
        mean, std: the input normalisation (per RGB channel, on the 0-1 scale).
        tta: average the logits over a horizontal flip, as ``aimonk.inference.infer_probabilities`` does.
    """

    def __init__(self, model: nn.Module, mean, std, tta: bool):
        super().__init__()
        self.model, self.tta = model, tta
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std  # (B, 3, S, S)
        logits = self.model(x).float()  # (B, n_attributes)
        if self.tta:
            logits = (logits + self.model(torch.flip(x, dims=[3])).float()) / 2
        return torch.sigmoid(logits)


def require_onnx():
    """The ``onnx`` module, or an ImportError that says how to install the optional extra."""
    try:
        import onnx
    except ImportError:
        raise ImportError(f"ONNX export and the ONNX runtimes need the optional extra: {DEPLOY_EXTRA}") from None
    return onnx


def to_onnx(model: nn.Module, meta: CheckpointMeta):
    """The ONNX graph of ``model`` with ``meta``'s preprocessing and TTA, with a dynamic batch axis.

    Returns:
        An ``onnx.ModelProto`` without aimonk metadata (``seal`` adds it).
    """
    require_onnx()
    deploy = DeployModel(model, meta.mean, meta.std, meta.tta).eval()
    example = torch.zeros(2, 3, meta.image_size, meta.image_size, dtype=torch.uint8)  # (B, 3, S, S)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        warnings.simplefilter("ignore")
        program = torch.onnx.export(deploy, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes={"images": {0: batch}},
                                    verbose=False, optimize=True)
    return program.model_proto


def artifact_metadata(meta: CheckpointMeta, checkpoint_sha256: str, precision: str = "fp32") -> dict[str, str]:
    """The ``aimonk.*`` metadata of an export of the checkpoint ``meta`` describes (keys without the prefix).

    Args:
        meta: the checkpoint's metadata.
        checkpoint_sha256: the sha256 of the checkpoint file.
        precision: ``"fp32"`` or ``"int8"``.
    Returns:
        Plain strings (JSON for lists and mappings), without the two digests.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    values = {"backbone": meta.backbone, "attributes": meta.attributes, "image_size": meta.image_size,
              "mean": list(meta.mean), "std": list(meta.std), "thresholds": list(meta.thresholds),
              "decisions": meta.decisions, "tta": meta.tta, "probe": meta.probe}
    return {"format": ARTIFACT_FORMAT, "schema_version": str(ARTIFACT_SCHEMA_VERSION), "aimonk_version": __version__,
            "checkpoint_sha256": checkpoint_sha256, "precision": precision, "input": INPUT_TEXT,
            "output": OUTPUT_TEXT, **{k: json.dumps(v) for k, v in values.items()}}


def seal(proto, props: dict[str, str]) -> bytes:
    """Put ``props`` into ``proto``'s ``metadata_props`` with the graph and metadata digests.

    Returns:
        The serialised model, ready to write.
    """
    del proto.metadata_props[:]
    proto.doc_string = f"aimonk {__version__} export: multilabel attribute probabilities ({OUTPUT_TEXT})"
    values = {**props, "graph_sha256": _sha256(proto.SerializeToString())}
    values["metadata_sha256"] = _metadata_digest(values)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = PREFIX + key, value
    return proto.SerializeToString()


def export_onnx(model: nn.Module, meta: CheckpointMeta, out: str | os.PathLike, checkpoint_sha256: str) -> Path:
    """Export ``model`` (fp32) to ``out`` as a sealed aimonk ONNX file, written atomically.

    Args:
        model: the checkpoint's network, in eval mode, on the CPU.
        meta: the checkpoint's metadata.
        out: the destination ``.onnx`` file.
        checkpoint_sha256: the sha256 of the checkpoint file.
    Returns:
        The path written.
    """
    data = seal(to_onnx(model, meta), artifact_metadata(meta, checkpoint_sha256, "fp32"))
    return atomic_write_bytes(out, data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _metadata_digest(values: dict[str, str]) -> str:
    return _sha256(json.dumps({k: v for k, v in values.items() if k != "metadata_sha256"}, sort_keys=True).encode())


@dataclass
class Artifact:
    """An exported model file, read and verified."""

    path: Path
    meta: CheckpointMeta  # what the metadata says, in the checkpoint's schema
    precision: str  # fp32 or int8
    checkpoint_sha256: str  # the checkpoint it was exported from
    props: dict[str, str]  # every aimonk.* field, without the prefix
    data: bytes  # the file's bytes, as verified


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model (``.onnx``, or OpenVINO IR ``.xml``) rather than a checkpoint."""
    return Path(path).suffix.lower() in (".onnx", IR_SUFFIX)


def is_ir(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an OpenVINO IR export (``.xml``, its weights in the ``.bin`` beside it)."""
    return Path(path).suffix.lower() == IR_SUFFIX


def read_artifact(path: str | os.PathLike, checkpoint_sha256: str | None = None) -> Artifact:
    """Read an exported model file and verify it.

    Args:
        path: a ``.onnx`` file written by ``export_onnx`` or ``python -m aimonk export``, or the ``.xml``
            of an OpenVINO IR export (``--format openvino``; its ``.bin`` is checked against its digest).
        checkpoint_sha256: if given, the file must have been exported from the checkpoint with this sha256.
    Returns:
        The verified ``Artifact``.
    Raises:
        ArtifactError: one line naming the file, if it is missing, not ONNX, truncated, lacks the
            aimonk metadata, has its metadata or graph altered, or comes from another checkpoint.
    """
    path = Path(path)
    props, data = _read_ir(path) if is_ir(path) else _read_onnx(path)
    if checkpoint_sha256 is not None and props["checkpoint_sha256"] != checkpoint_sha256:
        raise ArtifactError(f"{path}: exported from another checkpoint (sha256 {props['checkpoint_sha256'][:16]}..., "
                            f"expected {checkpoint_sha256[:16]}...); export this checkpoint again")
    return Artifact(path, _meta_of(path, props), props["precision"], props["checkpoint_sha256"], props, data)


def _read_onnx(path: Path) -> tuple[dict[str, str], bytes]:
    """The aimonk metadata and the bytes of a ``.onnx`` export, its fields and both digests checked."""
    proto, data = _parse(path)
    props = {p.key[len(PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(PREFIX)}
    _check_fields(path, props)
    _check_metadata_digest(path, props)
    del proto.metadata_props[:]
    if _sha256(proto.SerializeToString()) != props["graph_sha256"]:
        raise ArtifactError(f"{path}: its graph was altered after export (the graph digest does not match); "
                            "export it again: python -m aimonk export --model CHECKPOINT")
    return props, data


def _check_metadata_digest(path: Path, props: dict[str, str]) -> None:
    if _metadata_digest({k: v for k, v in props.items() if k != IR_WEIGHTS_KEY}) != props["metadata_sha256"]:
        raise ArtifactError(f"{path}: its aimonk metadata was altered after export (the metadata digest does not "
                            "match); export it again: python -m aimonk export --model CHECKPOINT")


def _read_ir(path: Path) -> tuple[dict[str, str], bytes]:
    """The aimonk metadata (IR ``rt_info``) and the ``.xml`` bytes of an OpenVINO IR export, its fields,
    its metadata digest and the digest of its ``.bin`` checked."""
    try:
        import openvino as ov
    except ImportError:
        raise ImportError(f"an OpenVINO IR export needs openvino: {DEPLOY_EXTRA}") from None
    weights = path.with_suffix(".bin")
    for f in (path, weights):
        if not f.is_file():
            raise ArtifactError(f"{f}: model file not found")
    try:
        model = ov.Core().read_model(str(path))
        info = model.get_rt_info()
        keys = list(info["aimonk"]) if "aimonk" in info else []
        props = {k: model.get_rt_info(["aimonk", k]).astype(str) for k in keys}
    except Exception:  # OpenVINO's parser errors: truncated or not IR
        raise ArtifactError(f"{path}: not a readable OpenVINO IR model (truncated or damaged); export it again") from None
    _check_fields(path, props)
    _check_metadata_digest(path, props)
    if _sha256(weights.read_bytes()) != props.get(IR_WEIGHTS_KEY):
        raise ArtifactError(f"{weights}: its weights were altered after export (the digest does not match); "
                            "export it again: python -m aimonk export --model CHECKPOINT --format openvino")
    return props, path.read_bytes()


def _parse(path: Path):
    """``(ModelProto, bytes)`` of ``path``, or an ArtifactError saying why it is not a readable ONNX file."""
    onnx = require_onnx()
    if not path.is_file():
        raise ArtifactError(f"{path}: model file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not data:
        raise ArtifactError(f"{path}: empty file (0 bytes); expected an ONNX model exported by aimonk")
    try:
        proto = onnx.load_model_from_string(data)
    except Exception:  # protobuf's DecodeError and kin: truncated or not ONNX at all
        raise ArtifactError(f"{path}: not a readable ONNX model (truncated or damaged); export it again") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise ArtifactError(f"{path}: not a readable ONNX model (no graph: truncated or damaged); export it again")
    return proto, data


def _check_fields(path: Path, props: dict[str, str]) -> None:
    """Refuse a file without aimonk metadata, with fields missing, of another format or of a newer schema."""
    if not props:
        raise ArtifactError(f"{path}: not an aimonk export: its ONNX metadata has no aimonk fields (export one with: "
                            "python -m aimonk export --model CHECKPOINT)")
    absent = [k for k in REQUIRED if k not in props]
    if absent:
        raise ArtifactError(f"{path}: its aimonk metadata lacks {absent}; it was changed after export (export it again)")
    if props["format"] != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: metadata format {props['format']!r:.40} is not {ARTIFACT_FORMAT!r}")
    if not props["schema_version"].isdigit() or int(props["schema_version"]) > ARTIFACT_SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema version {props['schema_version']!r:.20} is newer than this aimonk reads "
                            f"({ARTIFACT_SCHEMA_VERSION}); upgrade aimonk")
    if props["precision"] not in PRECISIONS:
        raise ArtifactError(f"{path}: metadata precision {props['precision']!r:.20} is not one of {list(PRECISIONS)}")


def _meta_of(path: Path, props: dict[str, str]) -> CheckpointMeta:
    """The ``CheckpointMeta`` the metadata describes, validated like a checkpoint's."""
    values = {"format": CHECKPOINT_FORMAT, "aimonk_version": props["aimonk_version"]}
    for key in ("backbone", "attributes", "image_size", "mean", "std", "thresholds", "decisions", "tta", "probe"):
        try:
            values["decision" if key == "decisions" else key] = json.loads(props[key])
        except ValueError:
            raise ArtifactError(f"{path}: metadata field {key!r} is not valid JSON") from None
    try:
        return CheckpointMeta.from_dict(values, path)
    except CheckpointError as e:
        raise ArtifactError(str(e)) from None


def probe_images(n: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """``n`` smooth random uint8 images (blurred noise, like photos rather than static): (n, 3, S, S)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (n, 3, max(2, image_size // 8), max(2, image_size // 8)), generator=g).float()
    return nn.functional.interpolate(low, size=(image_size, image_size), mode="bilinear").round().to(torch.uint8)


def parity(reference: np.ndarray, probs: np.ndarray, thresholds, decisions) -> dict:
    """How far ``probs`` are from ``reference`` (both (N, n_attributes)): the largest absolute
    difference and the number of decisions (image x attribute) that differ under the checkpoint's rules.

    Returns:
        ``{"images", "max_abs_diff", "decision_flips"}``.
    """
    flips = apply_decisions(reference, thresholds, decisions) != apply_decisions(probs, thresholds, decisions)
    return {"images": int(len(reference)), "max_abs_diff": float(np.abs(reference - probs).max(initial=0.0)),
            "decision_flips": int(flips.sum())}
