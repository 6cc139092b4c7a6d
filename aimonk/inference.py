"""The inference engine: batch-norm folding, ``infer_probabilities``, and the ``Predictor`` that loads a
checkpoint (or a model exported from one) once and predicts images (paths, PIL images or bytes) on torch,
ONNX Runtime or OpenVINO."""

from __future__ import annotations

import importlib.metadata
import json
import os
import statistics
import sys
import time
import warnings
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

from aimonk import __version__, config, int8
from aimonk.artifact import (
    DEPLOY_EXTRA,
    Artifact,
    ArtifactError,
    export_onnx,
    is_artifact,
    parity,
    probe_images,
    read_artifact,
)
from aimonk.backends import installed_runtimes, open_session
from aimonk.checkpoint import CheckpointMeta, load_checkpoint
from aimonk.data import ImageLoadError, ImageSource, decode_uint8, index_dataset, normalize_batch, read_reason, shown
from aimonk.files import atomic_write_text, file_sha256
from aimonk.metrics import apply_decisions, macro_average_precision
from aimonk.model import head_module
from aimonk.runtime import autocast, choose_execution, cpu_identity, select_device


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
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")  # what runs the model (see Predictor)
RUNTIME_ENV = "AIMONK_RUNTIME"  # the runtime when none is given; unset: "auto" (e.g. AIMONK_RUNTIME=torch keeps torch)
EXPORT_CACHE_NAME = "onnx"  # checkpoints exported for the ONNX runtimes, under config.CACHE_DIR
RUNTIME_CACHE_NAME = "runtime.json"  # runtime "auto"'s measured choices, under config.CACHE_DIR
PARITY_IMAGES = 8  # images that runtime "auto" verifies and times each runtime on
PARITY_TOLERANCE = 1e-4  # the largest probability difference from torch fp32 that "auto" accepts in fp32
# Runtime "auto" takes OpenVINO's bf16 only where it is verified on the checkpoint's own validation images
# (their folder found here, at least BF16_MIN_IMAGES of them): macro AP within BF16_AP_TOLERANCE of torch fp32
# and at most BF16_FLIP_SHARE of the decisions changed (held-out on the clipart folds: AP +0.0001 / -0.0058 /
# -0.0006, 0.2-0.6 % of decisions; docs/speed.md).
BF16_AP_TOLERANCE = 0.005
BF16_FLIP_SHARE = 0.01
BF16_MIN_IMAGES = 100
BF16_MAX_IMAGES = 1000  # validation images scored at most (evenly spaced), to keep the one-time check short
_reported_runtimes: set[str] = set()  # runtime choices already printed by this process


class Predictor:
    """A loaded model ready to predict: the model is loaded once and reused.

    Args:
        model_path: a checkpoint written by training (``.pth``), or a model exported from one
            (``.onnx``, ``python -m aimonk export``), which runs without torch's model code.
        device: ``"auto"`` or a torch device (torch runtime).
        precision: ``"auto"`` (per backbone and device), fp32, bf16, fp16, or int8 (CPU, for a
            checkpoint that carries int8 calibration; see ``aimonk.int8``). The ONNX runtimes run
            what was exported (fp32, or an int8 export); openvino also runs an fp32 export in bf16.
        runtime: ``None`` (``default_runtime()``: ``$AIMONK_RUNTIME``, else ``"auto"``), ``"torch"``
            (the reference), ``"onnxruntime"``, ``"openvino"``, or ``"auto"``: the
            fastest installed runtime whose probabilities match torch fp32 on ``PARITY_IMAGES``
            images (within ``PARITY_TOLERANCE``, no decision flip; OpenVINO in bf16 only on a CPU that offers
            it, and only where the checkpoint's validation images verify it, ``BF16_AP_TOLERANCE``: on the
            clipart folds it cost up to 0.006 held-out AP); the choice is measured once per
            checkpoint and machine, cached, and printed once to stderr. A checkpoint is exported to
            ONNX on first use for the ONNX runtimes (cached under ``config.CACHE_DIR``).
        artifact: for a checkpoint on an ONNX runtime, an export of it (``.onnx`` or ``.xml``) to use
            instead of the cached export; refused unless it was exported from this very checkpoint.
    Raises:
        CheckpointError: naming the file, for a damaged checkpoint, and (``ArtifactError``) for an
            exported file that is damaged, altered, or from another checkpoint.
    """

    def __init__(self, model_path: str | os.PathLike = config.DEFAULT_MODEL, device: str = "auto",
                 precision: str = "auto", runtime: str | None = None, artifact: str | os.PathLike | None = None):
        self.path = Path(model_path)
        if runtime is None:
            runtime = default_runtime()
            if runtime == "torch" and is_artifact(self.path):
                runtime = "auto"  # the environment's torch default, for a file that only the ONNX runtimes run
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
            raise ValueError(f"precision must be auto, fp32, bf16, fp16 or int8, got {precision!r}")
        self.session, self.runtime = None, "torch"
        if is_artifact(self.path):
            self._open_export(read_artifact(self.path), runtime, precision)
            return
        self.model, self.meta = load_checkpoint(self.path)
        self.device = select_device(device)
        self.attributes: list[str] = list(self.meta.attributes)
        self.image_size: int = self.meta.image_size
        self._prepare_torch(precision)
        if runtime != "torch":
            self._attach_runtime(runtime, precision, artifact)

    def _prepare_torch(self, precision: str) -> None:
        """Set up the torch model: int8, or batch norms folded and the measured precision and layout."""
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

    def _open_export(self, art: Artifact, runtime: str, precision: str) -> None:
        """Run an exported model: no torch model, the runtime asked for or the fastest installed one."""
        if runtime == "torch":
            raise ValueError(f"{self.path}: an exported model runs on onnxruntime or openvino, not torch; "
                             "give its checkpoint (.pth) to run it in torch")
        if precision not in ("auto", art.precision):
            raise ValueError(f"{self.path}: an {art.precision} export runs in {art.precision}, not {precision}")
        self.model, self.meta, self.device = None, art.meta, torch.device("cpu")
        self.attributes, self.image_size = list(self.meta.attributes), self.meta.image_size
        self.precision, self.channels_last = art.precision, False
        names = installed_runtimes(self.path) if runtime == "auto" else [runtime]
        if not names:
            raise ImportError(f"{self.path}: no runtime for an exported model is installed: {DEPLOY_EXTRA}")
        sessions = {name: open_session(name, art) for name in names}
        if len(sessions) > 1:
            images = probe_images(PARITY_IMAGES, self.image_size).numpy()
            rates = {name: _rate(s.run, images) for name, s in sessions.items()}
            names = [max(rates, key=rates.get)]
            _report_once(art.props["graph_sha256"],
                         f"{self.path}: runtime auto: {names[0]}; measured img/s: {_rates_text(rates)}")
        self.runtime, self.session = names[0], sessions[names[0]]

    def _attach_runtime(self, runtime: str, precision: str, artifact: str | os.PathLike | None) -> None:
        """Run the checkpoint on an ONNX runtime (``runtime`` auto: where it is verified and faster than torch)."""
        bf16 = runtime == "openvino" and precision == "bf16"  # the fp32 export, computed in bf16 by OpenVINO
        if runtime != "auto" and (self.device.type != "cpu" or precision not in ("auto", "fp32") and not bf16):
            raise ValueError(f"runtime {runtime!r} runs the fp32 export on the CPU (openvino in bf16 too); "
                             f"got device {self.device.type}, precision {precision}")
        if runtime == "auto" and (self.device.type != "cpu" or precision not in ("auto", "fp32")
                                  or not installed_runtimes()):
            return  # torch it is: nothing else runs this
        sha = file_sha256(self.path)
        bf16_allowed = runtime == "auto" and precision == "auto"  # an explicit fp32 keeps fp32
        choice = (runtime, "bf16" if bf16 else "fp32") if runtime != "auto" else \
            _cached_runtime_choice(self.path, sha, self.precision, bf16_allowed)
        if choice is not None and choice[0] == "torch":
            return
        art = read_artifact(artifact, sha) if artifact is not None else self._cached_export(sha)
        if choice is None:
            choice = self._measure_runtimes(art, sha, bf16_allowed)
            if choice[0] == "torch":
                return
        name, precision = choice
        self.session, self.runtime = open_session(name, art, precision=precision), name
        self.precision, self.channels_last = self.session.precision, False
        if self.precision != precision:
            warnings.warn(f"{self.path}: {name} computes in {self.precision} on this CPU, not {precision}: "
                          f"it offers no {precision}", stacklevel=3)

    def _cached_export(self, sha: str) -> Artifact:
        """This checkpoint's ONNX export from the cache, exported now if it is absent or unusable."""
        path = config.CACHE_DIR / EXPORT_CACHE_NAME / f"{sha[:32]}-{__version__}.onnx"
        try:
            return read_artifact(path, sha)
        except ArtifactError:
            model, meta = load_checkpoint(self.path)  # fp32, on the CPU
            fold_batchnorm(model)
            export_onnx(model, meta, path, sha)
            return read_artifact(path, sha)

    def _measure_runtimes(self, art: Artifact, sha: str, bf16_allowed: bool) -> tuple[str, str]:
        """Verify each installed runtime against torch fp32 on probe images (within ``PARITY_TOLERANCE``, no
        decision flip), time them and torch, and return (and cache, and print once) the fastest verified one
        as ``(runtime, precision)``."""
        images = probe_images(PARITY_IMAGES, self.image_size)
        reference = infer_probabilities(self.model, [(x,) for x in images], self.device, "fp32", self.channels_last,
                                        self.meta.mean, self.meta.std, tta=self.meta.tta)
        rates = {f"torch {self.precision}": _rate(lambda x: self.probabilities(torch.from_numpy(x)), images.numpy())}
        checks = {}
        verified_fp32 = None
        for name in installed_runtimes(art.path):
            session, label = open_session(name, art), f"{name} fp32"
            checks[label] = parity(reference, session.run(images.numpy()), self.meta.thresholds, self.meta.decisions)
            if checks[label]["max_abs_diff"] <= PARITY_TOLERANCE and checks[label]["decision_flips"] == 0:
                rates[label] = _rate(session.run, images.numpy())
                verified_fp32 = verified_fp32 or session
        if bf16_allowed and "openvino" in installed_runtimes(art.path):
            bf16 = open_session("openvino", art, precision="bf16")
            checks["openvino bf16"] = self._check_bf16(bf16, verified_fp32)
            if checks["openvino bf16"]["verified"]:
                rates["openvino bf16"] = _rate(bf16.run, images.numpy())
        best = max(rates, key=rates.get)
        choice = ("torch", self.precision) if best.startswith("torch") else tuple(best.split())
        _store_runtime_choice(_runtime_key(sha, self.precision, bf16_allowed),
                              {"choice": list(choice), "rates": rates, "parity": checks})
        verified = "; ".join(_check_text(n, c) for n, c in checks.items())
        _report_once(_runtime_key(sha, self.precision, bf16_allowed),
                     f"{self.path}: runtime auto: {' '.join(choice)}; against torch fp32 on {len(images)} images: "
                     f"{verified}; measured img/s: {_rates_text(rates)}")
        return choice

    def _check_bf16(self, bf16, fp32) -> dict:
        """OpenVINO bf16 against fp32 (``fp32``: a session verified against torch, else torch itself) on the
        checkpoint's validation images: ``{"verified", "images", "macro_ap_change", "max_abs_diff",
        "decision_flips"[, "reason"]}``."""
        if bf16.precision != "bf16":
            return {"verified": False, "images": 0, "reason": "this CPU offers no bf16: OpenVINO computes in f32"}
        val = validation_images(self.meta)
        if isinstance(val, str):
            return {"verified": False, "images": 0, "reason": val}
        images, targets = val
        run = fp32.run if fp32 is not None else lambda x: self.probabilities(torch.from_numpy(x))
        batches = range(0, len(images), 32)
        reference = np.concatenate([run(images[i:i + 32]) for i in batches])
        probs = np.concatenate([bf16.run(images[i:i + 32]) for i in batches])
        check = parity(reference, probs, self.meta.thresholds, self.meta.decisions)
        check["macro_ap_change"] = macro_average_precision(targets, probs) - macro_average_precision(targets, reference)
        check["verified"] = bool(abs(check["macro_ap_change"]) <= BF16_AP_TOLERANCE
                                 and check["decision_flips"] <= BF16_FLIP_SHARE * reference.size)
        return check

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
        """Probabilities for a uint8 batch (B, 3, S, S), on this predictor's runtime."""
        if self.session is not None:
            return self.session.run(images.numpy())
        return infer_probabilities(self.model, [(x,) for x in images], self.device, self.precision,
                                   self.channels_last, self.meta.mean, self.meta.std, tta=self.meta.tta)

    def dataset_probabilities(self, dataset, tta: bool | None = None, batch_size: int = 64) -> np.ndarray:
        """Probabilities for every item of ``dataset`` (items are ``(uint8 image, ...)``), on this predictor's
        runtime; ``tta`` other than the model's own runs the torch model (an export has its TTA built in).

        Returns:
            A float32 array of shape (N, n_attributes).
        """
        tta = self.meta.tta if tta is None else tta
        if self.session is None or tta != self.meta.tta:
            if self.model is None:
                raise ValueError(f"{self.path}: an exported model has flip TTA {'on' if self.meta.tta else 'off'} "
                                 "built in; score its checkpoint to change it")
            return infer_probabilities(self.model, dataset, self.device, self.precision, self.channels_last,
                                       self.meta.mean, self.meta.std, tta=tta, batch_size=batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        out = [self.session.run(batch[0].numpy()) for batch in loader]
        return np.concatenate(out) if out else np.zeros((0, len(self.attributes)), np.float32)

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



def default_runtime() -> str:
    """The runtime used when none is given: ``$AIMONK_RUNTIME`` if set, else ``"auto"``.

    Raises:
        ValueError: if ``$AIMONK_RUNTIME`` names no runtime.
    """
    value = os.environ.get(RUNTIME_ENV) or "auto"
    if value not in RUNTIMES:
        raise ValueError(f"${RUNTIME_ENV}={value!r}: the runtime must be one of {', '.join(RUNTIMES)}")
    return value



def _rate(run, images: np.ndarray, steps: int = 2) -> float:
    """Images per second of ``run(images)``: the median of ``steps`` timed calls after one warm-up call."""
    run(images)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)



def _rates_text(rates: dict[str, float]) -> str:
    return ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items())



def _report_once(key: str, line: str) -> None:
    """Print ``line`` to stderr, once per process for ``key`` (stdout stays the predictions, and valid --json)."""
    if key not in _reported_runtimes:
        _reported_runtimes.add(key)
        print(line, file=sys.stderr)



def _runtime_key(sha: str, precision: str, bf16_allowed: bool = False) -> str:
    versions = " ".join(f"{m} {_version(m)}" for m in ("torch", "onnxruntime", "openvino"))
    return (f"{sha} | {cpu_identity()} | {torch.get_num_threads()} threads | torch {precision}"
            f"{' | bf16 if verified' if bf16_allowed else ''} | {versions} | aimonk {__version__}")


def _check_text(label: str, check: dict) -> str:
    """One runtime's verification, in words."""
    if "macro_ap_change" in check:
        return (f"{label} on {check['images']} validation images: macro AP {check['macro_ap_change']:+.4f}, "
                f"{check['decision_flips']} decisions changed, max |dp| {check['max_abs_diff']:.1e} "
                f"({'verified' if check['verified'] else 'not verified'})")
    if "reason" in check:
        return f"{label} not verified ({check['reason']})"
    return f"{label} max |dp| {check['max_abs_diff']:.1e}, {check['decision_flips']} flips"


def validation_images(meta: CheckpointMeta) -> tuple[np.ndarray, np.ndarray] | str:
    """The checkpoint's validation images (uint8 (N, 3, S, S), up to ``BF16_MAX_IMAGES`` evenly spaced) and
    their labels, read from the data folder it records; or why they cannot be had here."""
    names = list((meta.split or {}).get("val") or [])
    recorded, labels = (meta.data or {}).get("dir"), (meta.data or {}).get("labels")
    if len(names) < BF16_MIN_IMAGES:
        return f"{len(names)} validation images recorded, {BF16_MIN_IMAGES} needed"
    folder = next((f for f in (recorded, recorded and config.resolve_path(recorded))
                   if f and (Path(f) / "labels.txt").is_file()), None)
    if folder is None:
        return f"its data folder {recorded!r} is not here"
    index = index_dataset(folder, warn=False, labels_file=labels if labels and Path(labels).is_file() else None)
    where = {n: i for i, n in enumerate(index.table.names)}
    rows = [where[n] for n in names if n in where]
    rows = [rows[i] for i in np.unique(np.linspace(0, len(rows) - 1, min(len(rows), BF16_MAX_IMAGES)).astype(int))]
    images, kept = [], []
    for i in rows:
        try:
            images.append(decode_uint8(index.paths[i], meta.image_size).numpy())
            kept.append(i)
        except ImageLoadError:  # unreadable now: judged on the others
            continue
    if len(kept) < BF16_MIN_IMAGES:
        return f"{len(kept)} of its validation images readable in {folder}, {BF16_MIN_IMAGES} needed"
    return np.stack(images), index.table.targets[kept]



def _version(module: str) -> str:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "absent"



def _cached_runtime_choice(path: Path, sha: str, precision: str, bf16_allowed: bool) -> tuple[str, str] | None:
    """Runtime auto's cached ``(runtime, precision)`` for this checkpoint, torch precision and machine (printed
    once), or None."""
    key = _runtime_key(sha, precision, bf16_allowed)
    entry = _read_json(config.CACHE_DIR / RUNTIME_CACHE_NAME).get(key)
    choice = entry.get("choice") if isinstance(entry, dict) else None
    allowed = ("fp32", precision, *(["bf16"] if bf16_allowed else []))
    if (not isinstance(choice, list) or len(choice) != 2 or choice[0] not in RUNTIMES[1:]
            or choice[1] not in allowed or not isinstance(entry.get("rates"), dict)):
        return None
    _report_once(key, f"{path}: runtime auto: {' '.join(choice)} (verified against torch fp32 and measured before; "
                      f"img/s: {_rates_text(entry['rates'])})")
    return choice[0], choice[1]



def _store_runtime_choice(key: str, entry: dict) -> None:
    path = config.CACHE_DIR / RUNTIME_CACHE_NAME
    known = _read_json(path)
    known[key] = entry
    try:
        atomic_write_text(path, json.dumps(known, indent=1))
    except OSError as e:  # an unwritable cache costs a measurement next time, nothing more
        warnings.warn(f"runtime choice not cached: {e}", stacklevel=3)



def _read_json(path: Path) -> dict:
    try:
        known = json.loads(path.read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or damaged: measured again



@lru_cache(maxsize=4)
def _cached_predictor(path: str, stamp: tuple, runtime: str | None) -> Predictor:
    return Predictor(path, runtime=runtime)



def get_predictor(model_path: str | os.PathLike = config.DEFAULT_MODEL, runtime: str | None = None) -> Predictor:
    """A shared ``Predictor`` for ``model_path`` on ``runtime``, reloaded only if the file changes."""
    p = Path(model_path).resolve()
    # ctime, inode and size as well as mtime: a copy that keeps the old mtime (cp -p, rsync -t) is still seen.
    st = p.stat() if p.is_file() else None
    stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size) if st else ()
    return _cached_predictor(str(p), stamp, runtime)



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
