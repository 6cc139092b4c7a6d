"""Speed of a trained model where it is used: a checkpoint on every runtime, against the original ResNet18 loop.

``python -m aimonk.benchmark speed --model M --data DIR [--limit N] [--runtimes torch,onnxruntime,openvino]``

For each runtime and precision of ``RUNTIME_VARIANTS`` (``torch`` at the precision ``auto`` picks and in
int8 where the checkpoint supports it, each installed ONNX runtime in fp32 and on an int8 export,
OpenVINO in bf16 too), the model is loaded as a user gets it (``deployed_predictor``) and measured in
turns with the seed's inference loop (``aimonk.benchmark.original``: an untrained ResNet18 at 224 px,
PIL decode, fp32 NCHW) on the same files:

- from files: ``Predictor.predict_many`` (decode, resize, batches of ``--infer-batch-size``) against
  ``original_infer``, two batches at a time each;
- model only: the predictor's ``probabilities`` on decoded uint8 batches against ResNet18 on the
  same batches, normalised;
- single-image latency: ``Predictor.predict(path)`` against ``original_predict_one``, call by call,
  over the first images, median;
- peak RSS while each side runs (the process's high-water mark, reset per phase), and the RSS the
  predictor added when it was loaded.

What runtime ``auto`` chooses for this checkpoint on this machine is recorded too. The ratios are
the figures to trust on a shared machine; the absolute img/s move with the load.
"""

from __future__ import annotations

import functools
import gc
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aimonk.backends import installed_runtimes
from aimonk.benchmark.measure import PeakRSS, current_rss, load_average, rate, timed
from aimonk.benchmark.original import original_infer, original_predict_one, original_transform
from aimonk.benchmark.workload import select_rows
from aimonk.config import IMAGENET_MEAN, IMAGENET_STD
from aimonk.data import decode_uint8, index_dataset, normalize_batch
from aimonk.export import export_model
from aimonk.inference import Predictor
from aimonk.model import build_model

ORIGINAL_SIZE = 224  # the seed loop's image size
RUNTIME_VARIANTS = (("torch", "auto"), ("torch", "int8"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                    ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"))
KEYS = ("infer", "infer_model_only", "latency_ms", "peak_rss_mb")  # what each side gets, per runtime


def deployed_predictor(model_path: str | Path, runtime: str, precision: str, data_dir: str | Path,
                       workdir: Path) -> Predictor | str:
    """The checkpoint ``model_path`` as deployed on ``runtime`` in ``precision``, or why it cannot run so.

    int8 on an ONNX runtime is the checkpoint's int8 export (``export_model``, calibrated on its training
    images in ``data_dir``), written once into ``workdir``; int8 on torch is the checkpoint's own
    calibration (``aimonk.int8``), where its backbone supports it. OpenVINO in bf16 on a CPU that offers
    no bf16 (it computes in f32 there) cannot run so either.
    """
    if precision == "int8" and runtime != "torch":
        return Predictor(int8_export(model_path, data_dir, workdir), runtime=runtime)
    try:
        with warnings.catch_warnings(record=True):  # a precision the CPU lacks: said in the returned reason
            predictor = Predictor(model_path, device="cpu", runtime=runtime, precision=precision)
    except ValueError as e:  # torch int8 refused, saying why (e.g. a probe ensemble, no calibration)
        if precision != "int8":
            raise
        return str(e).split(": ", 1)[-1]
    if precision != "auto" and predictor.precision != precision:
        return f"this CPU offers no {precision}: {runtime} computes in {predictor.precision}"
    return predictor


def int8_export(model_path: str | Path, data_dir: str | Path, workdir: Path) -> Path:
    """The checkpoint's int8 ONNX export in ``workdir``, written on the first call."""
    artifact = workdir / f"{Path(model_path).stem}-int8.onnx"
    if not artifact.is_file():
        export_model(model_path, artifact, precision="int8", data_dir=data_dir)
    return artifact


def compare_model(model_path: str | Path, data_dir: str | Path, runtimes: list[str] | None = None, limit: int = 0,
                  batch_size: int = 32, latency_calls: int = 20, log: Callable[[str], None] = print) -> dict:
    """Measure ``model_path`` on each runtime in turns with the original ResNet18 inference loop.

    Args:
        model_path: a checkpoint (``.pth``).
        data_dir: a folder with ``images/`` and ``labels.txt``; its images are the workload.
        runtimes: the runtimes to measure (default: torch and every installed ONNX runtime).
        limit: use this many images, evenly spaced (0 = all).
        batch_size: images per batch, both sides.
        latency_calls: single-image calls per side for the latency median.

    Returns:
        ``{"model", "backbone", "tta", "probe", "image_size", "n_images", "auto_choice", "variants": {label:
        {"runtime", "precision", "project": figures, "original": figures, "ratios": project / original}},
        "skipped": {label: why}}``.
    """
    index = index_dataset(data_dir, warn=False)
    paths = [index.paths[i] for i in select_rows(len(index.paths), limit)]
    for p in paths:
        p.read_bytes()  # every file in the OS cache before either side reads it
    original = build_model("resnet18", len(index.table.attributes), weights="none").eval()
    load_before, variants = load_average(), {}
    auto = Predictor(model_path, device="cpu", runtime="auto")
    auto_choice = f"{auto.runtime} {auto.precision}"
    wanted = {*(runtimes or ["torch", *installed_runtimes()]), auto.runtime}  # what auto chose is always measured
    del auto
    skipped = {}
    with tempfile.TemporaryDirectory(prefix="aimonk-deployed-") as tmp:
        for runtime, precision in RUNTIME_VARIANTS:
            if runtime not in wanted:
                continue
            if precision == "int8" and runtime != "torch":
                int8_export(model_path, data_dir, Path(tmp))  # before the measured load
            make = functools.partial(deployed_predictor, model_path, runtime, precision, data_dir, Path(tmp))
            figures = _measure(make, original, paths, batch_size, latency_calls)
            if isinstance(figures, str):
                skipped[f"{runtime} {precision}"] = figures
                log(f"{runtime} {precision}: skipped, {figures}")
                continue
            variants[figures["label"]] = figures
            log(f"{figures['label']}: from files {figures['project']['infer']:.1f} img/s "
                f"({figures['ratios']['infer']:.2f}x the original loop), model only "
                f"{figures['project']['infer_model_only']:.1f} img/s, latency {figures['project']['latency_ms']:.1f} ms")
            gc.collect()
    meta = Predictor(model_path, device="cpu", runtime="torch").meta
    return {"model": str(model_path), "data_dir": str(data_dir), "backbone": meta.backbone, "tta": meta.tta,
            "probe": meta.probe, "image_size": meta.image_size, "n_images": len(paths), "batch_size": batch_size,
            "latency_calls": latency_calls, "threads": torch.get_num_threads(), "auto_choice": auto_choice,
            "load_average": [load_before, load_average()], "variants": variants, "skipped": skipped}


def _measure(make: Callable[[], Predictor | str], original: torch.nn.Module, paths: list[Path], batch_size: int,
             latency_calls: int) -> dict | str:
    """One deployed model (``make()``) against the original loop: from files, model only, latency, memory
    (or why the model cannot run)."""
    rss, before = PeakRSS(), current_rss() or 0
    with rss.phase("project"):
        predictor = make()
    if isinstance(predictor, str):
        return predictor
    loaded = (current_rss() or 0) - before
    proj, orig = {}, {}
    tf = original_transform(ORIGINAL_SIZE, False)
    sides = {"project": lambda chunk: predictor.predict_many(chunk, batch_size=batch_size),
             "original": lambda chunk: original_infer(original, chunk, tf, torch.device("cpu"), batch_size)}
    seconds = _in_turns(sides, [paths[i:i + 2 * batch_size] for i in range(0, len(paths), 2 * batch_size)], rss)
    proj["infer"], orig["infer"] = rate(len(paths), seconds["project"]), rate(len(paths), seconds["original"])

    mine = torch.stack([decode_uint8(p, predictor.image_size) for p in paths])  # (N, 3, S, S) uint8
    theirs = torch.stack([decode_uint8(p, ORIGINAL_SIZE) for p in paths])

    def resnet(x):
        with torch.inference_mode():
            return torch.sigmoid(original(normalize_batch(x, "cpu", IMAGENET_MEAN, IMAGENET_STD)))

    sides = {"project": lambda i: predictor.probabilities(mine[i:i + batch_size]),
             "original": lambda i: resnet(theirs[i:i + batch_size])}
    seconds = _in_turns(sides, list(range(0, len(paths), batch_size)), rss)
    proj["infer_model_only"] = rate(len(paths), seconds["project"])
    orig["infer_model_only"] = rate(len(paths), seconds["original"])

    sides = {"project": lambda p: predictor.predict(p),
             "original": lambda p: original_predict_one(original, p, tf, torch.device("cpu"))}
    calls = [paths[i % len(paths)] for i in range(latency_calls)]
    times = _in_turns(sides, calls, rss, each=True)
    proj["latency_ms"], orig["latency_ms"] = (1e3 * statistics.median(times[s]) for s in ("project", "original"))
    proj["peak_rss_mb"], orig["peak_rss_mb"] = rss.peaks["project"] / 2**20, rss.peaks["original"] / 2**20
    proj["loaded_rss_mb"] = loaded / 2**20
    ratios = {key: proj[key] / orig[key] for key in KEYS if orig.get(key)}
    return {"label": f"{predictor.runtime} {predictor.precision}", "runtime": predictor.runtime, "precision": predictor.precision,
            "project": proj, "original": orig, "ratios": ratios}


def _in_turns(sides: dict[str, Callable], items: list, rss: PeakRSS, each: bool = False) -> dict:
    """Run every side on each item in turn after one untimed warm-up call each; total seconds per side
    (``each``: the list of per-call seconds)."""
    for run in sides.values():
        run(items[0])
    times: dict[str, list[float]] = {name: [] for name in sides}
    for item in items:
        for name, run in sides.items():
            with rss.phase(name):
                times[name].append(timed(lambda: run(item), torch.device("cpu"))[1])
    return times if each else {name: float(np.sum(t)) for name, t in times.items()}


def format_model_report(res: dict) -> str:
    """The figures as a plain-text table, one block of rows per runtime."""
    head = (f"{res['model']}: {res['backbone']}{' + probe on ' + ','.join(res['probe']['backbones']) if res.get('probe') else ''}, "
            f"{res['image_size']} px, flip TTA {'on' if res['tta'] else 'off'}; {res['n_images']} images from "
            f"{res['data_dir']}, batch {res['batch_size']}, {res['threads']} torch threads; runtime auto chooses "
            f"{res['auto_choice']}")
    lines = [head, "", f"{'runtime':18} {'from files img/s':>22} {'model only img/s':>22} {'latency ms':>20} "
             f"{'peak RSS MiB':>14}", f"{'':18} {'(original, ratio)':>22} {'(original, ratio)':>22} "
             f"{'(original, ratio)':>20}"]
    for label, v in res["variants"].items():
        p, o, r = v["project"], v["original"], v["ratios"]
        lines.append(f"{label:18} {p['infer']:7.1f} ({o['infer']:5.1f}, {r['infer']:4.2f}x) "
                     f"{p['infer_model_only']:7.1f} ({o['infer_model_only']:5.1f}, {r['infer_model_only']:4.2f}x) "
                     f"{p['latency_ms']:6.1f} ({o['latency_ms']:5.1f}, {r['latency_ms']:4.2f}x) {p['peak_rss_mb']:8.0f}")
    return "\n".join(lines)
