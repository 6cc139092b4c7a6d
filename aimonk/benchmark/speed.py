"""Speed benchmark: the original training and inference loop against the project's, in one process.

``python -m aimonk.benchmark speed --data DIR [--epochs 3] [--image-size 224] [--batch-size 16]
[--backbone resnet18] [--limit N] [--device auto|cpu|cuda]``

Both loops see the same images for the same number of epochs:

- original (``aimonk.benchmark.original``): a Dataset that PIL-decodes every image on every epoch
  through torchvision transforms (``Resize((S, S))``, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize``), fp32 NCHW, ``num_workers=0``, ``torch.optim.Adam`` with its default
  per-parameter loop, masked BCE. Inference decodes with PIL the same way and runs fp32 NCHW.
- project: ``DecodedCache`` (built from a cold, temporary cache folder inside the first epoch,
  file hashing included) + ``ImageDataset`` + ``train_one_epoch`` with
  ``resolve_precision("auto")``, channels_last and ``make_optimizer`` (fused Adam). Inference is
  ``Predictor.predict_many`` (model loaded once, batches through a DataLoader) and, for latency,
  ``Predictor.predict``. On a CPU, for a backbone that quantizes (ResNet18), the trained model is
  then calibrated for int8 and its inference compared with the original loop again (``--no-int8``
  skips it).

The two loops take turns (batch by batch, inference chunk by chunk, call by call) so that a load
change on a shared machine hits both alike: the ratios are the figures to trust, not the absolute
img/s. FLOPs are counted by ``torch.utils.flop_counter`` at 2 FLOP per multiply-add (twice the
multiply-add count that model cards quote), a training step as 3 forward passes. The reference
peak is the best of a few large bf16 matmuls (2 n^3 FLOP each) measured here, not a datasheet
figure. A run's figures are in its JSON and table under ``reports/benchmarks/``.

``--tune`` runs the tuning experiments of ``aimonk.benchmark.tune`` instead, and ``--model M`` measures a trained
checkpoint on every runtime against the original inference loop (``aimonk.benchmark.deployed``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from aimonk import int8
from aimonk.benchmark.measure import (
    PeakRSS,
    current_rss,
    forward_flops,
    load_average,
    measure_peak_flops,
    process_peak_rss,
    rate,
    sync,
    timed,
)
from aimonk.benchmark.deployed import compare_model, format_model_report
from aimonk.benchmark.original import (
    OriginalDataset,
    original_infer,
    original_predict_one,
    original_train_step,
    original_transform,
)
from aimonk.benchmark.report import run_info
from aimonk.benchmark.tune import TUNING_EXPERIMENTS, tune
from aimonk.benchmark.workload import SpeedConfig, drop_lone_last, load_images
from aimonk.cache import DecodedCache
from aimonk.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint, update_checkpoint
from aimonk.data import ImageDataset, file_digest
from aimonk.files import atomic_write_text
from aimonk.inference import infer_probabilities
from aimonk.losses import MaskedBCEWithLogitsLoss, compute_pos_weight
from aimonk.model import BACKBONES, BackboneSpec, build_model
from aimonk.predict import Predictor
from aimonk.runtime import choose_execution, select_device, set_seed
from aimonk.train import train_one_epoch, train_transform
from aimonk.train.loop import make_optimizer

INT8_KEYS = ("infer", "infer_model_only", "latency_ms")  # what is measured again with the int8 model
TRAIN_STEP_FORWARDS = 3  # a training step costs about three forward passes (forward, input grads, weight grads)
RATIO_KEYS = ("train_first", "train_steady", "infer", "infer_model_only", "latency_ms", "peak_rss_mb",
              "peak_rss_above_baseline_mb", *(f"{key}_int8" for key in INT8_KEYS))


# --------------------------------------------------------------------------- the comparison


def compare(cfg: SpeedConfig, log: Callable[[str], None] = print) -> dict:
    """Run the original and the project's loop on the same images, taking turns, and collect the figures.

    Args:
        cfg: the run's settings.
        log: where progress lines go.

    Returns:
        A dict with ``original`` and ``project`` figures (img/s, ms, bytes, shares), their
        ``ratios`` (project / original), the reference ``peak_flops`` and the setup.
    """
    device = select_device(cfg.device)
    _, paths, targets = load_images(cfg)  # a missing or bad folder stops the run before anything is measured
    # what `aimonk train` would run: precision "auto" is measured, with the memory format
    execution = choose_execution(cfg.precision, device, cfg.backbone, cfg.channels_last, "train", cfg.image_size,
                                 cfg.batch_size)
    precision, cfg = execution.precision, replace(cfg, channels_last=execution.channels_last)
    spec = BACKBONES[cfg.backbone]
    log(f"speed: {len(paths)} images from {cfg.data_dir}, {cfg.image_size} px, batch {cfg.batch_size}, "
        f"{cfg.backbone}, {cfg.epochs} epochs, device {device} ({torch.get_num_threads()} threads); "
        f"project precision {precision}, channels_last={cfg.channels_last}")

    load_before = load_average()
    dtypes = _peak_dtypes(cfg, device)
    peak = {key: measure_peak_flops(device, dtype, cfg.peak_size) for key, dtype in dtypes.items()}
    flops = forward_flops(cfg.backbone, targets.shape[1], cfg.image_size)
    log(f"reference peak (best {cfg.peak_size}x{cfg.peak_size} matmul): "
        + ", ".join(f"{key} {value / 1e9:.0f} G{'OP' if key == 'int8' else 'FLOP'}/s" for key, value in peak.items())
        + f"; {cfg.backbone} forward {flops / 1e9:.2f} GFLOP per image")

    baseline = current_rss() or 0  # torch and the libraries, before either loop holds anything
    rss = PeakRSS()
    with tempfile.TemporaryDirectory(prefix="aimonk-speed-") as tmp:
        res = _compare_loops(cfg, device, precision, spec, paths, targets, rss, Path(tmp), log)
    # The peak again at the end; the better of the two is the one least disturbed by other work.
    for key, dtype in dtypes.items():
        peak[key] = max(peak[key], measure_peak_flops(device, dtype, cfg.peak_size))
    _add_memory_and_shares(res, rss, baseline, flops, peak)
    return {
        "config": asdict(cfg), "device": str(device), "threads": torch.get_num_threads(), "precision": precision,
        "n_images": len(res["project"]["ok"]), "peak_flops": peak, "forward_flops": flops,
        "process_peak_rss_mb": process_peak_rss() / 2**20, "baseline_rss_mb": baseline / 2**20,
        "load_average": [load_before, load_average()], "exact_peak_rss": rss.exact,
        "original": {k: v for k, v in res["original"].items()},
        "project": {k: v for k, v in res["project"].items() if k != "ok"},
        "ratios": {k: res["project"][k] / res["original"][k] for k in RATIO_KEYS if res["original"].get(k)},
    }


def _int8_applies(cfg: SpeedConfig, device: torch.device) -> bool:
    """Whether the run also measures the project's model in int8."""
    return cfg.int8 and device.type == "cpu" and int8.unsupported(cfg.backbone) is None


def _peak_dtypes(cfg: SpeedConfig, device: torch.device) -> dict[str, torch.dtype]:
    """The matmul dtypes whose peak the run measures, by report key."""
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if _int8_applies(cfg, device):
        dtypes["int8"] = torch.int8
    return dtypes


def _add_memory_and_shares(res: dict, rss: PeakRSS, baseline: int, flops: float, peak: dict[str, float]) -> None:
    """Add each loop's peak RSS and its throughputs as shares of the reference peaks to its figures."""
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


def _compare_loops(cfg: SpeedConfig, device: torch.device, precision: str, spec: BackboneSpec, paths: list[Path],
                   targets, rss: PeakRSS, tmp: Path, log: Callable[[str], None]) -> dict:
    """Both loops on the same images, in turns: training, batched inference, latency, then the project in int8.

    Returns:
        ``{"original": figures, "project": figures}``; the project's figures hold ``ok``, the rows
        its cache could decode.
    """
    c = _Comparison(cfg, device, precision, spec, rss, log)
    orig_model, proj_model, cache, ok = c.train(paths, targets, tmp)
    ok_paths = [paths[i] for i in ok]
    ckpt = _save_project_model(proj_model, cfg, spec, targets.shape[1], tmp / "model.pth")
    with rss.phase("project"):
        predictor = Predictor(ckpt, device=str(device), precision=cfg.precision, runtime="torch")  # the torch loop
    c.inference(predictor, orig_model, ok_paths, cache, ok, targets, c.orig, c.proj)
    c.latency(predictor, orig_model, ok_paths[0], c.orig, c.proj)
    if _int8_applies(cfg, device) and predictor.precision != "int8":
        c.in_int8(ckpt, orig_model, ok_paths, cache, ok, targets)
    return {"original": c.orig, "project": c.proj}


def _save_project_model(model: nn.Module, cfg: SpeedConfig, spec: BackboneSpec, n_attr: int, path: Path) -> Path:
    """The project loop's trained model as a checkpoint, for ``Predictor`` to load as a user would."""
    return save_checkpoint(path, model, CheckpointMeta(
        backbone=cfg.backbone, attributes=[f"Attr{j + 1}" for j in range(n_attr)], image_size=cfg.image_size,
        mean=list(spec.mean), std=list(spec.std), thresholds=[0.5] * n_attr))


class _Comparison:
    """The comparison's phases in turns, sharing the settings, the RSS monitor and each loop's figures."""

    def __init__(self, cfg: SpeedConfig, device: torch.device, precision: str, spec: BackboneSpec, rss: PeakRSS,
                 log: Callable[[str], None]):
        self.cfg, self.device, self.spec, self.rss, self.log = cfg, device, spec, rss, log
        self.precision = precision  # the project loop's training precision
        self.orig: dict = {"epoch_seconds": []}  # the original loop's figures
        self.proj: dict = {"epoch_seconds": []}  # the project loop's figures

    def new_model(self, n_attr: int, channels_last: bool) -> nn.Module:
        set_seed(self.cfg.seed)
        m = build_model(self.cfg.backbone, n_attr, weights="none").to(self.device)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    def train(self, paths: list[Path], targets, tmp: Path):
        """Training epochs, the loops taking turns batch by batch; the project's first epoch fills a cold cache.

        Returns:
            ``(original model, project model, cache, ok)``, ``ok`` being the rows the cache could decode.
        """
        orig_model, orig_step, proj_model, proj_step = self._training_setup(targets)
        orig_tf = original_transform(self.cfg.image_size, True, self.spec.mean, self.spec.std)
        cache = train_set = None
        ok = list(range(len(paths)))
        for epoch in range(self.cfg.epochs):
            # The loops take turns batch by batch, so a load change on the machine hits both alike.
            gen = lambda: torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)  # noqa: E731
            with self.rss.phase("project"):
                sync(self.device)
                t0 = time.perf_counter()
                if epoch == 0:  # cold cache: hashing and decoding count against the first epoch
                    cache, train_set = self._fill_cache(paths, targets, tmp / "cache", t0)
                    ok = cache.ok
                proj_batches = iter(DataLoader(train_set, batch_size=self.cfg.batch_size, shuffle=True,
                                               generator=gen(), drop_last=drop_lone_last(len(ok), self.cfg.batch_size),
                                               **_loader_kw(self.cfg.num_workers, self.device)))
                t_proj = time.perf_counter() - t0
            with self.rss.phase("original"):
                t0 = time.perf_counter()
                orig_loader = DataLoader(OriginalDataset([paths[i] for i in ok], targets[ok], orig_tf),
                                         batch_size=self.cfg.batch_size, shuffle=True, generator=gen(),
                                         drop_last=drop_lone_last(len(ok), self.cfg.batch_size), num_workers=0)
                orig_batches = iter(orig_loader)
                orig_model.train()
                t_orig = time.perf_counter() - t0
            t_orig, t_proj = self._batches_in_turns(len(orig_loader), orig_step, orig_batches, proj_step, proj_batches,
                                                    t_orig, t_proj)
            self.proj["epoch_seconds"].append(t_proj)
            self.orig["epoch_seconds"].append(t_orig)
            self.log(f"  epoch {epoch + 1}: original {rate(len(ok), t_orig):.1f} img/s, "
                     f"project {rate(len(ok), t_proj):.1f} img/s")
        for figures in (self.orig, self.proj):
            _add_training_rates(figures, len(ok))
        self.proj["cache_mb"] = sum(f.stat().st_size for f in (tmp / "cache").rglob("*.npy")) / 2**20
        self.proj["ok"] = ok
        return orig_model, proj_model, cache, ok

    def _training_setup(self, targets):
        """Both loops' models, each with its own training step: ``(orig_model, orig_step, proj_model, proj_step)``."""
        cfg, device, spec, precision = self.cfg, self.device, self.spec, self.precision
        n_attr = targets.shape[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a small --limit may leave an attribute without positives
            pos_weight = compute_pos_weight(targets)
        orig_model = self.new_model(n_attr, False)
        orig_opt = torch.optim.Adam(orig_model.parameters(), lr=1e-4)
        proj_model = self.new_model(n_attr, cfg.channels_last)
        proj_opt = make_optimizer(proj_model.parameters(), "adam", 1e-4, 0.0, device)
        criterion = MaskedBCEWithLogitsLoss(pos_weight).to(device)

        def orig_step(batch):
            return original_train_step(orig_model, batch, criterion, orig_opt, device)

        def proj_step(batch):  # train_one_epoch over a one-batch loader: the project's own step
            return train_one_epoch(proj_model, [batch], criterion, proj_opt, device, precision, cfg.channels_last,
                                   spec.mean, spec.std, progress=False)

        return orig_model, orig_step, proj_model, proj_step

    def _fill_cache(self, paths: list[Path], targets, folder: Path, t0: float):
        """Hash and decode every image into a cold cache; ``(cache, augmented training set)``."""
        digests = [file_digest(p) for p in paths]
        cache = DecodedCache(paths, self.cfg.image_size, folder, digests=digests, progress=False)
        self.proj["cache_seconds"] = time.perf_counter() - t0
        ok = cache.ok
        return cache, ImageDataset(Subset(cache, ok), targets[ok], train_transform("flip", self.cfg.image_size))

    def _batches_in_turns(self, n_batches: int, orig_step, orig_batches, proj_step, proj_batches,
                          t_orig: float, t_proj: float) -> tuple[float, float]:
        """One epoch's batches, the project's step then the original's; the seconds added to each loop's."""
        for _ in range(n_batches):
            with self.rss.phase("project"):
                t_proj += timed(lambda: proj_step(next(proj_batches)), self.device)[1]
            with self.rss.phase("original"):  # fetching the batch (PIL decoding) is inside the timing
                t_orig += timed(lambda: orig_step(next(orig_batches)), self.device)[1]
        return t_orig, t_proj

    def inference(self, predictor: Predictor, orig_model: nn.Module, paths: list[Path], cache, ok, targets,
                  orig: dict, proj: dict) -> None:
        """Batched inference from image files, chunk by chunk in turns; then model-only from decoded tensors.

        The figures go into ``orig`` and ``proj`` (the int8 pass collects its own, then renames them).
        """
        device, spec, bs = self.device, self.spec, self.cfg.infer_batch_size
        tf = original_transform(self.cfg.image_size, False, spec.mean, spec.std)
        predictor.predict_many(paths[:bs], batch_size=bs)  # warm-up, untimed
        original_infer(orig_model, paths[:bs], tf, device, bs)
        step = 2 * bs
        t_orig = t_proj = 0.0
        for start in range(0, len(paths), step):
            chunk = paths[start:start + step]
            with self.rss.phase("project"):
                t_proj += timed(lambda: predictor.predict_many(chunk, batch_size=bs), device)[1]
            with self.rss.phase("original"):
                t_orig += timed(lambda: original_infer(orig_model, chunk, tf, device, bs), device)[1]
        proj["infer"], orig["infer"] = rate(len(paths), t_proj), rate(len(paths), t_orig)

        decoded = ImageDataset(Subset(cache, ok), targets[ok])  # model only: no JPEG decoding on either side
        t_orig = t_proj = 0.0
        for start in range(0, len(ok), step):
            part = Subset(decoded, range(start, min(start + step, len(ok))))
            with self.rss.phase("project"):
                t_proj += timed(lambda: infer_probabilities(predictor.model, part, device, predictor.precision,
                                                            predictor.channels_last, spec.mean, spec.std,
                                                            batch_size=bs), device)[1]
            with self.rss.phase("original"):
                t_orig += timed(lambda: infer_probabilities(orig_model, part, device, "fp32", False, spec.mean,
                                                            spec.std, batch_size=bs), device)[1]
        proj["infer_model_only"], orig["infer_model_only"] = rate(len(ok), t_proj), rate(len(ok), t_orig)

    def latency(self, predictor: Predictor, orig_model: nn.Module, path: Path, orig: dict, proj: dict) -> None:
        """Median single-image latency (decode + forward), model already loaded, calls in turns."""
        tf = original_transform(self.cfg.image_size, False, self.spec.mean, self.spec.std)
        orig_model.eval()
        predictor.predict(path)  # warm-up, untimed
        original_predict_one(orig_model, path, tf, self.device)
        t_orig, t_proj = [], []
        for _ in range(self.cfg.latency_calls):
            with self.rss.phase("project"):
                t_proj.append(timed(lambda: predictor.predict(path), self.device)[1])
            with self.rss.phase("original"):
                t_orig.append(timed(lambda: original_predict_one(orig_model, path, tf, self.device), self.device)[1])
        proj["latency_ms"], orig["latency_ms"] = 1e3 * statistics.median(t_proj), 1e3 * statistics.median(t_orig)

    def in_int8(self, ckpt: Path, orig_model: nn.Module, paths: list[Path], cache, ok, targets) -> None:
        """The same trained model in int8, against the original loop again; figures under ``*_int8`` keys."""
        # Calibrated on the training images, as training does.
        with self.rss.phase("project"):
            t0 = time.perf_counter()
            model, _ = load_checkpoint(ckpt)
            plain = ImageDataset(Subset(cache, ok), targets[ok])
            update_checkpoint(ckpt, int8=int8.calibrate(model, plain, self.cfg.image_size, self.spec.mean,
                                                        self.spec.std))
            self.proj["int8_calibration_seconds"] = time.perf_counter() - t0
            predictor = Predictor(ckpt, device="cpu", precision="int8")
        o8, p8 = {}, {}
        self.inference(predictor, orig_model, paths, cache, ok, targets, o8, p8)
        self.latency(predictor, orig_model, paths[0], o8, p8)
        for key in INT8_KEYS:
            self.orig[f"{key}_int8"], self.proj[f"{key}_int8"] = o8[key], p8[key]
        self.log(f"  int8: inference from files {p8['infer']:.1f} img/s (original {o8['infer']:.1f}), "
            f"model only {p8['infer_model_only']:.1f} img/s")


def _loader_kw(num_workers: int, device: torch.device) -> dict:
    return dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)


def _add_training_rates(figures: dict, n_images: int) -> None:
    """First-epoch and steady (median of epochs 2..N) img/s from a loop's ``epoch_seconds``."""
    rates = [rate(n_images, s) for s in figures["epoch_seconds"]]
    figures["train_first"] = rates[0]
    figures["train_steady"] = statistics.median(rates[1:]) if len(rates) > 1 else float("nan")


# --------------------------------------------------------------------------- the report


def _fmt_load(loads) -> str:
    return " -> ".join("?" if x is None else f"{x:.1f}" for x in loads)


def format_report(res: dict) -> str:
    """The comparison as a plain-text table with the ratios and the notes needed to read it."""
    return "\n".join([*_report_table(res), "", *_report_notes(res)])


def _report_table(res: dict) -> list[str]:
    """original | project | project/original, one line per figure."""
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
    return lines


def _report_notes(res: dict) -> list[str]:
    """The setup and the method, one paragraph per line, below the table."""
    p, cfg = res["project"], res["config"]
    n, s = res["n_images"], cfg["image_size"]
    return [
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
    p.add_argument("--model", default=None,
                   help="measure this trained checkpoint on every runtime against the original ResNet18 inference "
                        "loop instead (aimonk.benchmark.deployed); --data, --limit, --infer-batch-size and "
                        "--latency-calls apply")
    p.add_argument("--runtimes", default="", help="with --model: comma-separated runtimes (default: all installed)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m aimonk.benchmark speed``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = vars(build_parser().parse_args(argv))
    json_path, run_tune, model, runtimes = a.pop("json"), a.pop("tune"), a.pop("model"), a.pop("runtimes")
    info = run_info("speed", argv)  # the machine, versions, command and date, taken before the run loads the machine
    cfg = SpeedConfig(**a)
    try:
        if model:
            res = compare_model(model, cfg.data_dir, [r for r in runtimes.split(",") if r] or None, cfg.limit,
                                cfg.infer_batch_size, cfg.latency_calls)
            print()
            print(format_model_report(res))
        elif run_tune:
            res = tune(cfg)
        else:
            res = compare(cfg)
            print()
            print(format_report(res))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if json_path:
        record = {"benchmark": "deployed" if model else "speed", "run": info, **res}
        atomic_write_text(json_path, json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
