"""Speed benchmark: the original training and inference loop against the project's, in one process.

``python -m aimonk.benchmark speed --data DIR [--epochs 3] [--image-size 224] [--batch-size 16]
[--backbone resnet18] [--limit N] [--device auto|cpu|cuda]``

Both loops see the same images for the same number of epochs:

- original: a Dataset that PIL-decodes every image on every epoch through torchvision transforms
  (``Resize((S, S))``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``), fp32 NCHW,
  ``num_workers=0``, ``torch.optim.Adam`` with its default per-parameter loop, masked BCE.
  Inference decodes with PIL the same way and runs fp32 NCHW.
- project: ``DecodedCache`` (built from a cold, temporary cache folder inside the first epoch,
  file hashing included) + ``ImageDataset`` + ``train_one_epoch`` with
  ``resolve_precision("auto")``, channels_last and ``make_optimizer`` (fused Adam). Inference is
  ``Predictor.predict_many`` (model loaded once, batches through a DataLoader) and, for latency,
  ``Predictor.predict``. On a CPU, for a backbone that quantizes (ResNet18), the trained model is
  then calibrated for int8 and its inference compared with the original loop again (``--no-int8``
  skips it).

The two loops take turns (batch by batch, inference chunk by chunk, call by call) so that a load
change on a shared machine hits both alike: the ratios are the figures to trust, not the absolute
img/s. FLOPs are counted by ``torch.utils.flop_counter`` at 2 FLOP per multiply-add (ResNet18 at
224 px: 3.63 GFLOP, i.e. the usual "1.82 GFLOPs" multiply-adds), a training step as 3 forward
passes. The reference peak is the best of a few large bf16 matmuls (2 n^3 FLOP each) measured
here, not a datasheet figure.

``--tune`` runs the tuning experiments instead: DataLoader workers / pinning / persistent
workers on the cached loader, precision x memory format for the backbone, the Adam kernel,
BatchNorm folding, and with ``--compile`` also ``torch.compile`` (``--experiments`` picks some).
Other jobs on the machine shrink the ratios (OpenMP threads wait for cores, and the faster loop
loses more): compare ratios within one run and note the load average it prints.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from aimonk import config, int8
from aimonk.benchmark.report import run_info
from aimonk.cache import DecodedCache
from aimonk.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint, update_checkpoint
from aimonk.data import ImageDataset, file_digest, index_dataset
from aimonk.inference import fold_batchnorm, infer_probabilities
from aimonk.losses import MaskedBCEWithLogitsLoss, compute_pos_weight
from aimonk.model import BACKBONES, build_model
from aimonk.predict import Predictor
from aimonk.runtime import resolve_precision, select_device, set_seed
from aimonk.train import train_one_epoch, train_transform
from aimonk.train.loop import make_optimizer

TUNING_EXPERIMENTS = ("loader", "precision", "optimizer", "fold", "compile")
INT8_KEYS = ("infer", "infer_model_only", "latency_ms")  # what is measured again with the int8 model
TRAIN_STEP_FORWARDS = 3  # a training step costs about three forward passes (forward, input grads, weight grads)


@dataclass
class SpeedConfig:
    """What the speed benchmark runs; the CLI flags fill it."""

    data_dir: str  # folder with labels.txt and images/
    epochs: int = 3  # training epochs for each loop (>= 2 gives a steady state)
    image_size: int = 224  # images are resized to image_size x image_size
    batch_size: int = 16  # training batch size, both loops
    backbone: str = "resnet18"  # "resnet18" or "efficientnet_lite0"
    limit: int = 0  # use this many images, evenly spaced over labels.txt (0 = all)
    device: str = "auto"  # "auto", "cpu" or "cuda"
    precision: str = "auto"  # the project loop's precision ("auto" = per backbone and device)
    channels_last: bool = True  # the project loop's memory format
    num_workers: int = 0  # the project loop's DataLoader workers
    infer_batch_size: int = 32  # batch size of batched inference, both loops
    latency_calls: int = 20  # single-image predictions timed for the latency median
    peak_size: int = 4096  # side of the square bf16 matmul that measures the reference peak
    seed: int = 0  # model initialisation and shuffling
    tune_images: int = 128  # tuning: images per tuning epoch
    tune_rounds: int = 3  # tuning: rounds of every variant (medians over rounds)
    experiments: str = "loader,precision,optimizer,fold"  # tuning: which experiments, comma-separated
    compile: bool = False  # tuning: also measure torch.compile
    int8: bool = True  # also compare inference with the project's model in int8 (CPU, backbones with cpu_int8)


# --------------------------------------------------------------------------- measuring helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _current_rss() -> int | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None


def _load_average() -> float | None:
    """The 1-minute load average (runnable processes), to say how busy the machine was."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def process_peak_rss() -> int:
    """The process's lifetime peak resident memory in bytes (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``VmHWM``) to the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_since_reset() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakRSS:
    """The peak resident memory of each labelled phase: ``with monitor.phase("original"): ...``.

    On Linux it reads the kernel's high-water mark, reset at the start of every phase, so the peak
    is exact and costs nothing while the phase runs. Elsewhere it falls back to the RSS at the
    phase edges (a lower bound). There is deliberately no sampling thread: one waking every 10 ms
    made the bf16 training step twice as slow on the shared 2-core machine.
    """

    def __init__(self):
        self.peaks: dict[str, int] = {}
        self.exact = _reset_peak_rss() and _peak_rss_since_reset() is not None

    @contextmanager
    def phase(self, label: str):
        start = _reset_peak_rss() if self.exact else _current_rss()
        try:
            yield
        finally:
            peak = _peak_rss_since_reset() if self.exact else max(start or 0, _current_rss() or 0)
            self.peaks[label] = max(self.peaks.get(label, 0), peak or 0)


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 4096,
                       repeats: int = 3) -> float:
    """Best FLOP/s of ``repeats`` n x n matmuls in ``dtype`` (2 n^3 FLOP each), after one warm-up.

    The best rather than the median, because on a shared machine the fastest run is the one least
    disturbed by other work.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    if dtype == torch.int8:  # int8 x int8 -> int32, the VNNI path int8 convolutions use
        a = torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8).to(device)
        b = torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8).to(device)
        matmul = torch._int_mm
    else:
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        matmul = torch.matmul
    matmul(a, b)
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def forward_flops(backbone: str, num_attributes: int, image_size: int) -> float:
    """FLOPs of one forward pass on one image (2 FLOP per multiply-add), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(backbone, num_attributes, weights="none").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- the original loop


def original_transform(image_size: int, train: bool, mean=config.IMAGENET_MEAN, std=config.IMAGENET_STD):
    """The original solution's torchvision preprocessing, on full-resolution PIL images."""
    from torchvision import transforms as T

    steps = [T.Resize((image_size, image_size))]
    if train:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class OriginalDataset(Dataset):
    """The original-style dataset: opens and decodes the JPEG with PIL on every access."""

    def __init__(self, paths: Sequence[Path], targets: np.ndarray, transform):
        self.paths = list(paths)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            x = self.transform(img.convert("RGB"))  # (3, S, S) float32, normalised
        return x, self.targets[i]


def original_train_step(model: nn.Module, batch, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                        device: torch.device) -> float:
    """One fp32 NCHW optimisation step, the way the original solution trains (``model.train()`` is the caller's).

    Returns:
        The loss.
    """
    x, y = batch[0].to(device), batch[1].to(device)  # (B, 3, S, S), (B, n_attributes)
    logits = model(x)  # (B, n_attributes)
    loss = criterion(logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def original_infer(model: nn.Module, paths: Sequence[Path], transform, device: torch.device,
                   batch_size: int) -> np.ndarray:
    """Probabilities the original way: PIL decode per image, fp32 NCHW batches (N, n_attributes)."""
    model.eval()
    ds = OriginalDataset(paths, np.zeros((len(paths), 1)), transform)
    out = [torch.sigmoid(model(x.to(device))).cpu() for x, _ in DataLoader(ds, batch_size=batch_size)]
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------- the comparison


def _select(n: int, limit: int) -> np.ndarray:
    """``limit`` row indices spread evenly over ``n`` rows (all rows if ``limit`` is 0 or too big)."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def _int8_applies(cfg: SpeedConfig, device: torch.device) -> bool:
    """Whether the run also measures the project's model in int8."""
    return cfg.int8 and device.type == "cpu" and int8.unsupported(cfg.backbone) is None


def _loader_kw(num_workers: int, device: torch.device) -> dict:
    return dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)


def _drop_last(n: int, batch_size: int) -> bool:
    return n % batch_size == 1  # a lone last image breaks BatchNorm in train mode


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def _timed(fn: Callable, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _load_data(cfg: SpeedConfig):
    """The benchmark's images and targets, with every file read once so both loops find it in the OS cache."""
    index = index_dataset(cfg.data_dir, warn=False)
    rows = _select(len(index.paths), cfg.limit)
    paths = [index.paths[i] for i in rows]
    for p in paths:
        p.read_bytes()
    return index, paths, index.table.targets[rows]


def compare(cfg: SpeedConfig, log: Callable[[str], None] = print) -> dict:
    """Run the original and the project's loop on the same images, taking turns, and collect the figures.

    Returns:
        A dict with ``original`` and ``project`` figures (img/s, ms, bytes, shares), their
        ``ratios`` (project / original), the reference ``peak_flops`` and the setup.
    """
    device = select_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, cfg.backbone)
    spec = BACKBONES[cfg.backbone]
    index, paths, targets = _load_data(cfg)
    n_attr = targets.shape[1]
    log(f"speed: {len(paths)} images from {cfg.data_dir}, {cfg.image_size} px, batch {cfg.batch_size}, "
        f"{cfg.backbone}, {cfg.epochs} epochs, device {device} ({torch.get_num_threads()} threads); "
        f"project precision {precision}, channels_last={cfg.channels_last}")

    load_before = _load_average()
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if _int8_applies(cfg, device):
        dtypes["int8"] = torch.int8
    peak = {key: measure_peak_flops(device, dtype, cfg.peak_size) for key, dtype in dtypes.items()}
    flops = forward_flops(cfg.backbone, n_attr, cfg.image_size)
    log(f"reference peak (best {cfg.peak_size}x{cfg.peak_size} matmul): "
        + ", ".join(f"{key} {value / 1e9:.0f} G{'OP' if key == 'int8' else 'FLOP'}/s" for key, value in peak.items())
        + f"; {cfg.backbone} forward {flops / 1e9:.2f} GFLOP per image")

    baseline = _current_rss() or 0  # torch and the libraries, before either loop holds anything
    rss = PeakRSS()
    with tempfile.TemporaryDirectory(prefix="aimonk-speed-") as tmp:
        res = _compare_loops(cfg, device, precision, spec, paths, targets, rss, Path(tmp), log)
    # The peak again at the end; the better of the two is the one least disturbed by other work.
    for key, dtype in dtypes.items():
        peak[key] = max(peak[key], measure_peak_flops(device, dtype, cfg.peak_size))
    for loop in ("original", "project"):
        r = res[loop]
        r["peak_rss_mb"] = rss.peaks.get(loop, 0) / 2**20
        r["peak_rss_above_baseline_mb"] = max(rss.peaks.get(loop, 0) - baseline, 0) / 2**20
        r["train_share_bf16_peak"] = r["train_steady"] * TRAIN_STEP_FORWARDS * flops / peak["bf16"]
        r["infer_share_bf16_peak"] = r["infer"] * flops / peak["bf16"]
        r["infer_model_only_share_bf16_peak"] = r["infer_model_only"] * flops / peak["bf16"]
    if "infer_int8" in res["project"]:  # the int8 model against the int8 matmul peak
        p = res["project"]
        p["infer_int8_share_int8_peak"] = p["infer_int8"] * flops / peak["int8"]
        p["infer_model_only_int8_share_int8_peak"] = p["infer_model_only_int8"] * flops / peak["int8"]
    ratios = {k: res["project"][k] / res["original"][k]
              for k in ("train_first", "train_steady", "infer", "infer_model_only", "latency_ms", "peak_rss_mb",
                        "peak_rss_above_baseline_mb", *(f"{key}_int8" for key in INT8_KEYS))
              if res["original"].get(k)}
    return {
        "config": asdict(cfg), "device": str(device), "threads": torch.get_num_threads(), "precision": precision,
        "n_images": len(res["project"]["ok"]), "peak_flops": peak, "forward_flops": flops,
        "process_peak_rss_mb": process_peak_rss() / 2**20, "baseline_rss_mb": baseline / 2**20,
        "load_average": [load_before, _load_average()], "exact_peak_rss": rss.exact,
        "original": {k: v for k, v in res["original"].items()},
        "project": {k: v for k, v in res["project"].items() if k != "ok"},
        "ratios": ratios,
    }


def _compare_loops(cfg, device, precision, spec, paths, targets, rss: PeakRSS, tmp: Path, log) -> dict:
    n_attr = targets.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a small --limit may leave an attribute without positives
        pos_weight = compute_pos_weight(targets)

    def new_model(channels_last: bool) -> nn.Module:
        set_seed(cfg.seed)
        m = build_model(cfg.backbone, n_attr, weights="none").to(device)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    orig_model = new_model(False)
    orig_opt = torch.optim.Adam(orig_model.parameters(), lr=1e-4)
    proj_model = new_model(cfg.channels_last)
    proj_opt = make_optimizer(proj_model.parameters(), "adam", 1e-4, 0.0, device)
    criterion = MaskedBCEWithLogitsLoss(pos_weight).to(device)
    orig_tf = original_transform(cfg.image_size, True, spec.mean, spec.std)

    orig = {"epoch_seconds": []}
    proj = {"epoch_seconds": []}
    cache = train_set = None
    ok = list(range(len(paths)))
    for epoch in range(cfg.epochs):
        # The loops take turns batch by batch, so a load change on the machine hits both alike.
        gen = lambda: torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # noqa: E731
        with rss.phase("project"):
            _sync(device)
            t0 = time.perf_counter()
            if epoch == 0:  # cold cache: hashing and decoding count against the first epoch
                digests = [file_digest(p) for p in paths]
                cache = DecodedCache(paths, cfg.image_size, tmp / "cache", digests=digests, progress=False)
                proj["cache_seconds"] = time.perf_counter() - t0
                ok = cache.ok
                train_set = ImageDataset(Subset(cache, ok), targets[ok], train_transform("flip", cfg.image_size))
            proj_batches = iter(DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen(),
                                           drop_last=_drop_last(len(ok), cfg.batch_size),
                                           **_loader_kw(cfg.num_workers, device)))
            t_proj = time.perf_counter() - t0
        with rss.phase("original"):
            t0 = time.perf_counter()
            orig_loader = DataLoader(OriginalDataset([paths[i] for i in ok], targets[ok], orig_tf),
                                     batch_size=cfg.batch_size, shuffle=True, generator=gen(),
                                     drop_last=_drop_last(len(ok), cfg.batch_size), num_workers=0)
            orig_batches = iter(orig_loader)
            orig_model.train()
            t_orig = time.perf_counter() - t0
        for _ in range(len(orig_loader)):
            with rss.phase("project"):  # train_one_epoch over a one-batch loader: the project's own step
                t_proj += _timed(lambda: train_one_epoch(proj_model, [next(proj_batches)], criterion, proj_opt, device,
                                                         precision, cfg.channels_last, spec.mean, spec.std,
                                                         progress=False), device)[1]
            with rss.phase("original"):  # fetching the batch (PIL decoding) is inside the timing
                t_orig += _timed(lambda: original_train_step(orig_model, next(orig_batches), criterion, orig_opt,
                                                             device), device)[1]
        proj["epoch_seconds"].append(t_proj)
        orig["epoch_seconds"].append(t_orig)
        log(f"  epoch {epoch + 1}: original {_rate(len(ok), t_orig):.1f} img/s, project {_rate(len(ok), t_proj):.1f} img/s")
    for r in (orig, proj):
        rates = [_rate(len(ok), s) for s in r["epoch_seconds"]]
        r["train_first"] = rates[0]
        r["train_steady"] = statistics.median(rates[1:]) if len(rates) > 1 else float("nan")
    proj["cache_mb"] = sum(f.stat().st_size for f in (tmp / "cache").rglob("*.npy")) / 2**20
    proj["ok"] = ok

    ok_paths = [paths[i] for i in ok]
    ckpt = save_checkpoint(tmp / "model.pth", proj_model, CheckpointMeta(
        backbone=cfg.backbone, attributes=[f"Attr{j + 1}" for j in range(n_attr)], image_size=cfg.image_size,
        mean=list(spec.mean), std=list(spec.std), thresholds=[0.5] * n_attr))
    with rss.phase("project"):
        predictor = Predictor(ckpt, device=str(device), precision=cfg.precision)
    _compare_inference(cfg, device, predictor, orig_model, spec, ok_paths, cache, ok, targets, rss, orig, proj)
    _compare_latency(cfg, device, predictor, orig_model, spec, ok_paths[0], rss, orig, proj)
    if _int8_applies(cfg, device) and predictor.precision != "int8":
        # The same trained model in int8, calibrated on the training images as training does, compared
        # in turns with the original loop again.
        with rss.phase("project"):
            t0 = time.perf_counter()
            model, _ = load_checkpoint(ckpt)
            plain = ImageDataset(Subset(cache, ok), targets[ok])
            update_checkpoint(ckpt, int8=int8.calibrate(model, plain, cfg.image_size, spec.mean, spec.std))
            proj["int8_calibration_seconds"] = time.perf_counter() - t0
            predictor = Predictor(ckpt, device="cpu", precision="int8")
        o8, p8 = {}, {}
        _compare_inference(cfg, device, predictor, orig_model, spec, ok_paths, cache, ok, targets, rss, o8, p8)
        _compare_latency(cfg, device, predictor, orig_model, spec, ok_paths[0], rss, o8, p8)
        for key in INT8_KEYS:
            orig[f"{key}_int8"], proj[f"{key}_int8"] = o8[key], p8[key]
        log(f"  int8: inference from files {p8['infer']:.1f} img/s (original {o8['infer']:.1f}), "
            f"model only {p8['infer_model_only']:.1f} img/s")
    return {"original": orig, "project": proj}


def _compare_inference(cfg, device, predictor, orig_model, spec, paths, cache, ok, targets, rss, orig, proj) -> None:
    """Batched inference from image files, chunk by chunk in turns; then model-only from decoded tensors."""
    tf = original_transform(cfg.image_size, False, spec.mean, spec.std)
    bs = cfg.infer_batch_size
    predictor.predict_many(paths[:bs], batch_size=bs)  # warm-up, untimed
    original_infer(orig_model, paths[:bs], tf, device, bs)
    step = 2 * bs
    t_orig = t_proj = 0.0
    for start in range(0, len(paths), step):
        chunk = paths[start:start + step]
        with rss.phase("project"):
            t_proj += _timed(lambda: predictor.predict_many(chunk, batch_size=bs), device)[1]
        with rss.phase("original"):
            t_orig += _timed(lambda: original_infer(orig_model, chunk, tf, device, bs), device)[1]
    proj["infer"], orig["infer"] = _rate(len(paths), t_proj), _rate(len(paths), t_orig)

    decoded = ImageDataset(Subset(cache, ok), targets[ok])  # model only: no JPEG decoding on either side
    t_orig = t_proj = 0.0
    for start in range(0, len(ok), step):
        part = Subset(decoded, range(start, min(start + step, len(ok))))
        with rss.phase("project"):
            t_proj += _timed(lambda: infer_probabilities(predictor.model, part, device, predictor.precision,
                                                         predictor.channels_last, spec.mean, spec.std,
                                                         batch_size=bs), device)[1]
        with rss.phase("original"):
            t_orig += _timed(lambda: infer_probabilities(orig_model, part, device, "fp32", False, spec.mean, spec.std,
                                                         batch_size=bs), device)[1]
    proj["infer_model_only"], orig["infer_model_only"] = _rate(len(ok), t_proj), _rate(len(ok), t_orig)


def _compare_latency(cfg, device, predictor, orig_model, spec, path: Path, rss, orig, proj) -> None:
    """Median single-image latency (decode + forward), model already loaded, calls in turns."""
    from PIL import Image

    tf = original_transform(cfg.image_size, False, spec.mean, spec.std)

    @torch.no_grad()
    def original_one():
        with Image.open(path) as img:
            x = tf(img.convert("RGB"))[None].to(device)  # (1, 3, S, S)
        return torch.sigmoid(orig_model(x)).cpu()

    orig_model.eval()
    predictor.predict(path)  # warm-up, untimed
    original_one()
    t_orig, t_proj = [], []
    for _ in range(cfg.latency_calls):
        with rss.phase("project"):
            t_proj.append(_timed(lambda: predictor.predict(path), device)[1])
        with rss.phase("original"):
            t_orig.append(_timed(original_one, device)[1])
    proj["latency_ms"], orig["latency_ms"] = 1e3 * statistics.median(t_proj), 1e3 * statistics.median(t_orig)


def _fmt_load(loads) -> str:
    return " -> ".join("?" if x is None else f"{x:.1f}" for x in loads)


def format_report(res: dict) -> str:
    """The comparison as a plain-text table with the ratios and the notes needed to read it."""
    o, p, r = res["original"], res["project"], res["ratios"]
    cfg = res["config"]
    rows = [
        ("training, first epoch (img/s)", "train_first", "{:.1f}"),
        ("training, steady state (img/s)", "train_steady", "{:.1f}"),
        (f"inference from files, batch {cfg['infer_batch_size']} (img/s)", "infer", "{:.1f}"),
        ("inference from decoded tensors, model only (img/s)", "infer_model_only", "{:.1f}"),
        (f"single-image latency, median of {cfg['latency_calls']} (ms)", "latency_ms", "{:.1f}"),
        *([("inference from files, project in int8 (img/s)", "infer_int8", "{:.1f}"),
           ("inference, model only, project in int8 (img/s)", "infer_model_only_int8", "{:.1f}"),
           ("single-image latency, project in int8 (ms)", "latency_ms_int8", "{:.1f}")] if "infer_int8" in p else []),
        ("peak RSS while the loop runs (MiB)", "peak_rss_mb", "{:.0f}"),
        ("  the same, above the RSS before both loops (MiB)", "peak_rss_above_baseline_mb", "{:.0f}"),
        ("training: share of the bf16 peak", "train_share_bf16_peak", "{:.1%}"),
        ("inference from files: share of the bf16 peak", "infer_share_bf16_peak", "{:.1%}"),
        ("inference, model only: share of the bf16 peak", "infer_model_only_share_bf16_peak", "{:.1%}"),
    ]
    int8_rows = [("inference from files, int8: share of the int8 peak", "infer_int8_share_int8_peak"),
                 ("inference, model only, int8: share of the int8 peak", "infer_model_only_int8_share_int8_peak")]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'':{width}}  {'original':>9}  {'project':>9}  {'project/original':>16}"]
    for name, key, fmt in rows:
        ratio = r.get(key, p[key] / o[key] if o.get(key) else float("nan"))
        lines.append(f"{name:{width}}  {fmt.format(o[key]):>9}  {fmt.format(p[key]):>9}  {ratio:>15.2f}x")
    for name, key in [row for row in int8_rows if row[1] in p]:  # the original loop has no int8 figure
        lines.append(f"{name:{width}}  {'-':>9}  {p[key]:>9.1%}")
    n, s = res["n_images"], cfg["image_size"]
    lines += [
        "",
        f"Setup: {n} images, {s} px, batch {cfg['batch_size']}, {cfg['backbone']}, {cfg['epochs']} epochs per loop, "
        f"device {res['device']} ({res['threads']} threads), load average {_fmt_load(res['load_average'])}. "
        "Original: PIL decode every epoch, fp32 NCHW, "
        f"num_workers=0, per-parameter Adam. Project: decoded cache, {res['precision']} "
        f"{'channels_last' if cfg['channels_last'] else 'NCHW'}, fused Adam, num_workers={cfg['num_workers']}.",
        f"Project first epoch includes hashing and decoding {n} images into a cold cache: {p['cache_seconds']:.1f} s.",
        *([f"int8: the project's trained model quantized (aimonk.int8; calibration on the training images took "
           f"{p['int8_calibration_seconds']:.1f} s) and compared with the original loop again, in turns. Its shares are "
           "of the int8 matmul peak (on AVX512-VNNI about twice the bf16 peak)."]
          if "infer_int8" in p else []),
        "Steady state = median over epochs 2..N. Latency and RSS: lower is better (ratio < 1 = project better).",
        "The loops take turns batch by batch (inference: 2 batches at a time; latency: call by call).",
        f"Reference peak: best {cfg['peak_size']}x{cfg['peak_size']} bf16 matmul, measured before and after, "
        f"{res['peak_flops']['bf16'] / 1e9:.0f} GFLOP/s (fp32: {res['peak_flops']['fp32'] / 1e9:.0f} GFLOP/s"
        + (f"; int8, torch._int_mm: {res['peak_flops']['int8'] / 1e9:.0f} GOP/s" if "int8" in res["peak_flops"] else "")
        + "); "
        f"{cfg['backbone']} forward = {res['forward_flops'] / 1e9:.2f} GFLOP/image at {s} px (2 FLOP per multiply-add), "
        f"training step = {TRAIN_STEP_FORWARDS}x forward.",
        f"Memory: the cache is one .npy per image on disk, 3*S*S bytes ({3 * s * s / 1024:.0f} KiB at {s} px; "
        f"{p['cache_mb']:.0f} MiB here), read one item at a time, so RAM is O(batch) and does not grow with the "
        f"number of images; disk grows linearly. RSS before both loops (torch and libraries): "
        f"{res['baseline_rss_mb']:.0f} MiB; process peak (getrusage): {res['process_peak_rss_mb']:.0f} MiB. Both "
        "loops' models live in the one process throughout; per-loop peaks are "
        f"{'exact (kernel high-water mark)' if res['exact_peak_rss'] else 'RSS at phase edges (a lower bound)'}.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- tuning experiments


def _race(runs: dict[str, Callable], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Call every variant once (first call: warm-up, compilation), then ``rounds`` times in turns.

    Returns:
        Seconds per call for each variant; element 0 is the first call.
    """
    times = {k: [_timed(fn, device)[1]] for k, fn in runs.items()}
    for _ in range(rounds):
        for k, fn in runs.items():
            times[k].append(_timed(fn, device)[1])
    return times


def _steady_rate(times: list[float], images: int) -> float:
    """img/s from the median of the calls after the first."""
    return _rate(images, statistics.median(times[1:] or times))


def tune(cfg: SpeedConfig, log: Callable[[str], None] = print) -> dict:
    """Measure the project loop's knobs on cached data, variants taking turns; print and return medians.

    - DataLoader ``num_workers`` 0/1/2, ``persistent_workers`` and (CUDA only) ``pin_memory``;
      plus the loader alone, to show whether it can be the bottleneck.
    - precision x memory format for training epochs and batched inference of the backbone.
    - the Adam kernel (per-parameter loop, foreach, fused).
    - BatchNorm folding for inference (what ``Predictor`` does).
    - with ``cfg.compile``: ``torch.compile`` first epoch (compilation included) and steady epochs vs eager.
    """
    device = select_device(cfg.device)
    _, paths, targets = _load_data(cfg)
    out: dict = {"device": str(device), "threads": torch.get_num_threads(), "backbone": cfg.backbone}
    with tempfile.TemporaryDirectory(prefix="aimonk-tune-") as tmp:
        cache = DecodedCache(paths, cfg.image_size, tmp, progress=False)
        ok = cache.ok[: cfg.tune_images]
        train_set = ImageDataset(Subset(cache, ok), targets[ok], train_transform("flip", cfg.image_size))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            criterion = MaskedBCEWithLogitsLoss(compute_pos_weight(targets[ok])).to(device)
        log(f"tune: {len(ok)} cached images at {cfg.image_size} px, batch {cfg.batch_size}, {cfg.backbone}, "
            f"device {device} ({torch.get_num_threads()} threads); {cfg.tune_rounds} rounds in turns, medians")
        t = _Tuning(cfg, device, train_set, targets.shape[1], criterion, log)
        chosen = [e.strip() for e in cfg.experiments.split(",") if e.strip()] + (["compile"] if cfg.compile else [])
        for name in dict.fromkeys(chosen):
            if name not in TUNING_EXPERIMENTS:
                raise ValueError(f"unknown tuning experiment {name!r}; choose from {', '.join(TUNING_EXPERIMENTS)}")
            out[name] = {"loader": t.loader, "precision": t.precision_and_format, "optimizer": t.optimizer,
                         "fold": t.fold, "compile": t.compile}[name]()
    return out


class _Tuning:
    """The tuning experiments, sharing one cached training set."""

    def __init__(self, cfg: SpeedConfig, device, train_set: ImageDataset, n_attr: int, criterion, log):
        self.cfg, self.device, self.train_set, self.n_attr, self.criterion, self.log = (
            cfg, device, train_set, n_attr, criterion, log)
        self.spec = BACKBONES[cfg.backbone]
        self.precision = resolve_precision(cfg.precision, device, cfg.backbone)
        self.plain = ImageDataset(train_set.images, train_set.targets.numpy())  # no augmentation, for inference
        self.loader0 = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=False,
                                  drop_last=_drop_last(len(train_set), cfg.batch_size))

    def model(self, channels_last: bool = True) -> nn.Module:
        set_seed(self.cfg.seed)
        m = build_model(self.cfg.backbone, self.n_attr, weights="none").to(self.device)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    def epoch(self, model, optimizer, loader=None, precision=None, channels_last=True, scaler=None) -> Callable:
        return lambda: train_one_epoch(model, loader or self.loader0, self.criterion, optimizer, self.device,
                                       precision or self.precision, channels_last, self.spec.mean, self.spec.std,
                                       scaler=scaler, progress=False)

    def infer(self, model, precision=None, channels_last=True) -> Callable:
        return lambda: infer_probabilities(model, self.plain, self.device, precision or self.precision, channels_last,
                                           self.spec.mean, self.spec.std, batch_size=self.cfg.infer_batch_size)

    def show(self, title: str, rates: dict[str, float]) -> dict[str, float]:
        base = next(iter(rates.values()))
        self.log(title)
        for k, v in rates.items():
            self.log(f"  {k:44s} {v:8.1f} img/s  {v / base:5.2f}x")
        return rates

    def loader(self) -> dict:
        variants = [(0, False, False), (1, False, False), (1, True, False), (2, False, False), (2, True, False)]
        if self.device.type == "cuda":
            variants += [(0, False, True), (2, True, True)]
        model = self.model()
        opt = make_optimizer(model.parameters(), "adam", 1e-4, 0.0, self.device)
        runs = {}
        for w, persistent, pin in variants:
            loader = DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=True, num_workers=w,
                                persistent_workers=persistent, pin_memory=pin,
                                drop_last=_drop_last(len(self.train_set), self.cfg.batch_size))
            runs[f"num_workers={w} persistent={persistent} pin_memory={pin}"] = self.epoch(model, opt, loader)
        runs["loader alone (no model), num_workers=0"] = lambda: sum(len(x) for x, _ in self.loader0)
        times = _race(runs, self.cfg.tune_rounds, self.device)
        return self.show("DataLoader (training epochs on the cached uint8 loader, one model):",
                         {k: _steady_rate(v, len(self.train_set)) for k, v in times.items()})

    def precision_and_format(self) -> dict:
        combos = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
        if self.device.type == "cuda":
            combos.append(("fp16", True))
        name = {c: f"{c[0]} {'channels_last' if c[1] else 'NCHW'}" for c in combos}
        models = {c: self.model(c[1]) for c in combos}
        runs = {}
        for c in combos:
            opt = make_optimizer(models[c].parameters(), "adam", 1e-4, 0.0, self.device)
            scaler = torch.amp.GradScaler("cuda") if c[0] == "fp16" else None
            runs[("train", c)] = self.epoch(models[c], opt, precision=c[0], channels_last=c[1], scaler=scaler)
            runs[("infer", c)] = self.infer(models[c], precision=c[0], channels_last=c[1])
        times = _race(runs, self.cfg.tune_rounds, self.device)
        res = {name[c]: {"train": _steady_rate(times[("train", c)], len(self.train_set)),
                         "infer": _steady_rate(times[("infer", c)], len(self.plain))} for c in combos}
        auto = resolve_precision("auto", self.device, self.cfg.backbone)
        best = {kind: max(res, key=lambda k: res[k][kind]) for kind in ("train", "infer")}
        base = res["fp32 NCHW"]
        self.log(f"precision x memory format ({self.cfg.backbone}; model only, cached inputs):")
        for k, v in res.items():
            self.log(f"  {k:20s} train {v['train']:7.1f} img/s ({v['train'] / base['train']:4.2f}x)   "
                     f"infer {v['infer']:7.1f} img/s ({v['infer'] / base['infer']:4.2f}x)")
        self.log(f"  fastest: training {best['train']}, inference {best['infer']}; resolve_precision('auto') gives "
                 f"{auto} (BACKBONES[{self.cfg.backbone!r}].cpu_bf16={self.spec.cpu_bf16})")
        return {"variants": res, "auto": auto, "fastest_train": best["train"], "fastest_infer": best["infer"],
                "cpu_bf16_flag": self.spec.cpu_bf16}

    def optimizer(self) -> dict:
        kinds = {"per-parameter loop (torch's default on CPU)": dict(foreach=False), "foreach": dict(foreach=True),
                 "fused (make_optimizer)": dict(fused=True)}
        runs = {}
        for k, kw in kinds.items():
            model = self.model()
            runs[k] = self.epoch(model, torch.optim.Adam(model.parameters(), lr=1e-4, **kw))
        times = _race(runs, self.cfg.tune_rounds, self.device)
        return self.show(f"Adam kernel ({self.precision}, channels_last, training epochs):",
                         {k: _steady_rate(v, len(self.train_set)) for k, v in times.items()})

    def fold(self) -> dict:
        trained = self.model().eval()
        folded = copy.deepcopy(trained)
        n = fold_batchnorm(folded)
        runs = {"as trained": self.infer(trained),
                "BatchNorm folded": self.infer(folded.to(memory_format=torch.channels_last))}
        times = _race(runs, self.cfg.tune_rounds, self.device)
        return self.show(f"inference ({self.precision}, channels_last, model only), {n} BatchNorms folded "
                         "as Predictor does:", {k: _steady_rate(v, len(self.plain)) for k, v in times.items()})

    def compile(self) -> dict:
        loader = DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=False, drop_last=True)
        models = {"eager": self.model(), "torch.compile": torch.compile(self.model())}
        runs = {k: self.epoch(m, make_optimizer(m.parameters(), "adam", 1e-4, 0.0, self.device), loader)
                for k, m in models.items()}
        times = _race(runs, self.cfg.tune_rounds, self.device)
        n = len(loader) * self.cfg.batch_size
        res = {k: {"first_epoch_s": v[0], "steady": _steady_rate(v, n)} for k, v in times.items()}
        self.log(f"torch.compile ({self.precision}, channels_last, training, {n} images per epoch):")
        for k, v in res.items():
            self.log(f"  {k:14s} first epoch {v['first_epoch_s']:7.1f} s   steady {v['steady']:7.1f} img/s")
        eager, comp = res["eager"], res["torch.compile"]
        self.log(f"  compiled/eager steady: {comp['steady'] / eager['steady']:.2f}x; the first epoch takes "
                 f"{comp['first_epoch_s'] - eager['first_epoch_s']:.0f} s longer")
        return res


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aimonk.benchmark speed", description=__doc__.splitlines()[0])
    p.add_argument("--data", dest="data_dir", required=True, help="folder with labels.txt and images/")
    p.add_argument("--epochs", type=int, default=3, help="training epochs per loop (>= 2 for a steady state)")
    p.add_argument("--image-size", type=int, default=224, help="images are resized to this square size")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size, both loops")
    p.add_argument("--backbone", default="resnet18", choices=sorted(BACKBONES), help="model architecture")
    p.add_argument("--limit", type=int, default=0, help="use this many images, evenly spaced (0 = all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", help="the project loop's precision: auto, fp32, bf16 or fp16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="the project loop's memory format")
    p.add_argument("--num-workers", type=int, default=0, help="the project loop's DataLoader workers")
    p.add_argument("--infer-batch-size", type=int, default=32, help="batch size for batched inference")
    p.add_argument("--latency-calls", type=int, default=20, help="single-image calls for the latency median")
    p.add_argument("--peak-size", type=int, default=4096, help="matmul side for the reference peak")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    p.add_argument("--tune", action="store_true", help="run the tuning experiments instead of the comparison")
    p.add_argument("--tune-images", type=int, default=128, help="tuning: images per epoch")
    p.add_argument("--tune-rounds", type=int, default=3, help="tuning: rounds per variant")
    p.add_argument("--experiments", default=SpeedConfig.experiments,
                   help=f"tuning: comma-separated, from {', '.join(TUNING_EXPERIMENTS)}")
    p.add_argument("--compile", action="store_true", help="tuning: also measure torch.compile")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare inference with the project's model in int8 (CPU, ResNet18)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m aimonk.benchmark speed``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = vars(build_parser().parse_args(argv))
    json_path, run_tune = a.pop("json"), a.pop("tune")
    info = run_info("speed", argv)  # the machine, versions, command and date, taken before the run loads the machine
    cfg = SpeedConfig(**a)
    try:
        if run_tune:
            res = tune(cfg)
        else:
            res = compare(cfg)
            print()
            print(format_report(res))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if json_path:
        Path(json_path).write_text(json.dumps({"benchmark": "speed", "run": info, **res}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
