"""The inference engine: batch-norm folding, ``infer_probabilities``, and the ``Predictor`` that loads a
checkpoint once and predicts images (paths, PIL images or bytes)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from aimonk import config, int8
from aimonk.checkpoint import CheckpointMeta, load_checkpoint
from aimonk.data import ImageLoadError, ImageSource, decode_uint8, normalize_batch, read_reason, shown
from aimonk.metrics import apply_decisions
from aimonk.model import head_module
from aimonk.runtime import autocast, choose_execution, select_device


@dataclass
class PredictionResult:
    """One image's prediction. ``str()`` gives the two seed-format lines."""

    image: str
    present: list[str]
    probabilities: dict[str, float]
    thresholds: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def __str__(self) -> str:
        if self.error:
            return f"Image: {shown(self.image)}\nError: {self.error}"
        return f"Image: {shown(self.image)}\nAttributes present: {self.present}"

    def to_dict(self) -> dict:
        return {"image": self.image, "present": self.present, "probabilities": self.probabilities,
                "thresholds": self.thresholds, "error": self.error}



@torch.inference_mode()
def infer_probabilities(
    model: nn.Module,
    dataset,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    mean: Sequence[float] = config.IMAGENET_MEAN,
    std: Sequence[float] = config.IMAGENET_STD,
    tta: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
) -> np.ndarray:
    """Sigmoid probabilities for every item of ``dataset`` (items are ``(uint8 image, ...)``).

    Returns:
        A float32 array of shape (N, n_attributes).
    """
    device = torch.device(device)
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for batch in loader:
        x = normalize_batch(batch[0], device, mean, std, channels_last)  # (B, 3, S, S)
        with autocast(device, precision):
            logits = model(x).float()  # (B, n_attributes)
            if tta:
                logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        out.append(torch.sigmoid(logits).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, head_module(model).out_features), np.float32)



class _DecodeDataset(torch.utils.data.Dataset):
    """Decodes images on the fly for batch prediction; an unreadable source (a bad image, a missing,
    unreadable or non-regular file, a folder) yields an error string instead of raising."""

    def __init__(self, sources: Sequence[ImageSource], names: Sequence[str], image_size: int):
        self.sources, self.names, self.image_size = list(sources), list(names), image_size

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        try:
            return decode_uint8(self.sources[i], self.image_size, name=self.names[i]), ""
        except ImageLoadError as e:
            return self._blank(), str(e)
        except OSError as e:  # e.g. the disk failed mid-read: still this image's error, not the run's
            return self._blank(), f"{shown(self.names[i])}: cannot read it: {read_reason(e)}"

    def _blank(self) -> torch.Tensor:
        return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch, decoded by threads (PIL releases the GIL): the cores the model leaves idle
        between batches decode instead of one. The DataLoader calls this in place of ``__getitem__``."""
        workers = min(len(indices), os.cpu_count() or 1, 4)
        if workers <= 1:
            return [self[i] for i in indices]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(self.__getitem__, indices))



def _name_of(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name
    return getattr(source, "filename", None) and Path(source.filename).name or getattr(source, "name", "<image>")



class _ConvLeafTracer(torch.fx.Tracer):
    """Traces through everything but convolutions and BatchNorms, whatever their subclass."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)



def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that only follows a Conv2d into that convolution, in place (eval mode only).

    The BatchNorm becomes ``nn.Identity`` and every module keeps its name, so the model still loads
    the same state-dict keys minus the folded statistics, and hooks on blocks keep working. It saves
    the BatchNorm passes at inference. A model
    that ``torch.fx`` cannot trace is left as it is.

    Returns:
        How many BatchNorms were folded.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode")
    try:
        graph = _ConvLeafTracer().trace(model)
    except Exception:  # dynamic control flow: keep the model unchanged
        return 0
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats or len(node.args) != 1:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if (isinstance(conv, nn.Conv2d) and len(src.users) == 1 and calls[src.target] == 1
                and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    for conv_name, bn_name in pairs:
        _set_submodule(model, conv_name, fuse_conv_bn_eval(modules[conv_name], modules[bn_name]))
        _set_submodule(model, bn_name, nn.Identity())
    return len(pairs)



def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)



def int8_problem(meta: CheckpointMeta, device: torch.device) -> str | None:
    """Why a checkpoint cannot run in int8 on ``device``, or None if it can."""
    if device.type != "cpu":
        return f"runs on the CPU only, not on {device.type}"
    problem = int8.unsupported(meta.backbone, meta.probe)
    if problem:
        return problem
    if not meta.int8:
        return "needs calibration, which this checkpoint lacks (add it: python -m aimonk calibrate-int8 --model MODEL --data DIR)"
    return None



INFER_BATCH = 32  # images per batch in predict_many, and the batch precision "auto" is measured at


class Predictor:
    """A loaded checkpoint ready to predict: the model is loaded once and reused.

    Args:
        model_path: a checkpoint written by training.
        device: ``"auto"`` or a torch device.
        precision: ``"auto"`` (per backbone and device), fp32, bf16, fp16, or int8 (CPU, for a
            checkpoint that carries int8 calibration; see ``aimonk.int8``).
    """

    def __init__(self, model_path: str | os.PathLike = config.DEFAULT_MODEL,
                 device: str = "auto", precision: str = "auto"):
        self.path = Path(model_path)
        self.model, self.meta = load_checkpoint(self.path)
        self.device = select_device(device)
        self.attributes: list[str] = list(self.meta.attributes)
        self.image_size: int = self.meta.image_size
        if precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
            raise ValueError(f"precision must be auto, fp32, bf16, fp16 or int8, got {precision!r}")
        if precision == "int8":
            problem = int8_problem(self.meta, self.device)
            if problem:
                raise ValueError(f"{self.path}: int8 inference {problem}; use precision 'auto', 'bf16' or 'fp32'")
            self.precision, self.channels_last = "int8", False
            self.model = int8.quantize(self.model, self.meta.int8, self.image_size)
            return
        fold_batchnorm(self.model)  # the model is only used for inference from here on
        execution = choose_execution(precision, self.device, self.meta.backbone, self.device.type != "mps", "infer",
                                     self.image_size, INFER_BATCH)
        self.precision, self.channels_last = execution.precision, execution.channels_last
        self.model = self.model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> list[list[str]]:
        """Present attributes per row of ``probs`` (N, n_attributes).

        With ``threshold=None`` each attribute uses its checkpoint decision: its tuned threshold,
        or, where validation found no signal, the majority decision. A given ``threshold`` applies
        to every attribute.
        """
        probs = np.atleast_2d(probs)
        if threshold is not None:
            present = probs >= threshold
        else:
            present = apply_decisions(probs, self.meta.thresholds, self.meta.decisions)
        return [[a for a, p in zip(self.attributes, row) if p] for row in present]

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Probabilities for a uint8 batch (B, 3, S, S)."""
        return infer_probabilities(self.model, [(x,) for x in images], self.device, self.precision,
                                   self.channels_last, self.meta.mean, self.meta.std, tta=self.meta.tta)

    def predict(self, image: ImageSource, threshold: float | None = None, name: str | None = None) -> PredictionResult:
        """Predict one image (path, PIL image or bytes).

        Raises:
            ImageLoadError: if the image cannot be read.
        """
        name = name or _name_of(image)
        x = decode_uint8(image, self.image_size, name=name)[None]  # (1, 3, S, S)
        probs = self.probabilities(x)[0]
        return self._result(name, probs, threshold)

    def predict_many(self, sources: Sequence[ImageSource], threshold: float | None = None,
                     batch_size: int = INFER_BATCH, num_workers: int = 0) -> list[PredictionResult]:
        """Batch prediction through a DataLoader; an unreadable image gives a result with ``error`` set.

        Never raises for one source: a file that is missing, a broken symbolic link, unreadable
        (permission denied), a FIFO or device (refused without blocking), a folder, or not an image
        gives one result with ``error`` naming it and saying why, and the others are still predicted.

        Returns:
            One ``PredictionResult`` per source, in order.
        """
        names = [_name_of(s) for s in sources]
        ds = _DecodeDataset(sources, [str(s) if isinstance(s, (str, os.PathLike)) else n for s, n in zip(sources, names)],
                            self.image_size)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
        results: list[PredictionResult] = []
        for x, errors in loader:
            probs = self.probabilities(x)
            for p, err in zip(probs, errors):
                name = names[len(results)]
                results.append(PredictionResult(name, [], {}, error=err) if err else self._result(name, p, threshold))
        return results

    def _result(self, name: str, probs: np.ndarray, threshold: float | None) -> PredictionResult:
        thr = [threshold] * len(self.attributes) if threshold is not None else self.meta.thresholds
        return PredictionResult(
            image=name,
            present=self.decide(probs, threshold)[0],
            probabilities={a: round(float(p), 4) for a, p in zip(self.attributes, probs)},
            thresholds={a: float(t) for a, t in zip(self.attributes, thr)},
        )



@lru_cache(maxsize=4)
def _cached_predictor(path: str, stamp: tuple) -> Predictor:
    return Predictor(path)



def get_predictor(model_path: str | os.PathLike = config.DEFAULT_MODEL) -> Predictor:
    """A shared ``Predictor`` for ``model_path``, reloaded only if the file changes."""
    p = Path(model_path).resolve()
    # ctime, inode and size as well as mtime: a copy that keeps the old mtime (cp -p, rsync -t) is still seen.
    st = p.stat() if p.is_file() else None
    stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size) if st else ()
    return _cached_predictor(str(p), stamp)



def list_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders into the image files they contain (sorted); other paths are kept as given.

    Nothing here reads a file, and nothing stops the walk: within a folder, every entry with an image
    extension that is not a folder is listed (a broken symbolic link or a FIFO too), and a folder or
    subfolder that cannot be listed (permission denied, a symbolic link loop) is listed itself, so
    that predicting each one gives an error entry that says why (``Predictor.predict_many``).
    Symbolic links to folders inside a folder are not followed.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(_walk_images(p) if p.is_dir() else [p])
    return out



def _walk_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` and the subfolders that could not be listed, sorted together."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, onerror=lambda e: found.append(Path(e.filename))):
        found.extend(Path(root, f) for f in files if Path(f).suffix.lower() in config.IMAGE_EXTENSIONS)
    return sorted(found)
