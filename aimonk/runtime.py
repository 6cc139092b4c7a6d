"""Where and how tensors run: device choice, precision, autocast and seeding."""

from __future__ import annotations

import json
import platform
import random
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aimonk import config
from aimonk.files import atomic_write_text
from aimonk.model import BACKBONES, build_model


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; anything else is passed to ``torch.device``."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@dataclass(frozen=True)
class Execution:
    """How a model runs: its autocast precision and its memory format."""

    precision: str  # fp32, bf16 or fp16
    channels_last: bool  # NHWC memory format

    def __str__(self) -> str:
        return f"{self.precision}{' + channels_last' if self.channels_last else ''}"


PROBE_STEPS = 3  # timed rounds after one warm-up round (the slower layout of a precision stops after the first)
BF16_MARGIN = 1.15  # bf16 must beat the best fp32 layout by this factor (past the probe's noise), so auto never picks a slower setting
PRECISION_CACHE_NAME = "precision.json"  # measured choices, under config.CACHE_DIR
_reported: set[str] = set()  # choices already printed by this process


def resolve_precision(precision: str, device: torch.device, backbone: str, **measure) -> str:
    """The precision ``choose_execution`` picks (``measure``: its mode, image_size and batch_size)."""
    return choose_execution(precision, device, backbone, **measure).precision


def choose_execution(precision: str, device: torch.device, backbone: str, channels_last: bool = True,
                     mode: str = "train", image_size: int = 224, batch_size: int = 16) -> Execution:
    """Turn ``precision`` (and the memory format) into what runs.

    An explicit precision is checked and kept, with ``channels_last`` as given. ``"auto"`` on CUDA is
    bf16 (fp16 where bf16 is missing). ``"auto"`` on the CPU is measured, never guessed from a CPU flag:
    a few ``mode`` steps ("train": forward and backward; "infer": forward) of ``backbone`` at
    ``batch_size`` x ``image_size`` in fp32 and bf16, each with channels_last on and off, and the
    fastest wins; bf16 only if it beats the best fp32 layout by ``BF16_MARGIN``, and for inference only
    for backbones whose ``BackboneSpec.cpu_bf16_infer`` allows it (training measures bf16 for every
    backbone). The result is cached per CPU (``cpu_identity``), torch version, thread count, backbone, mode, size,
    batch and the precisions measured, and printed once per process.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
        return Execution(precision, channels_last)
    if device.type == "cuda":
        return Execution("bf16" if torch.cuda.is_bf16_supported() else "fp16", channels_last)
    if device.type != "cpu":
        return Execution("fp32", channels_last)
    return _measured_choice(backbone, mode, image_size, batch_size)


def _measured_choice(backbone: str, mode: str, image_size: int, batch_size: int) -> Execution:
    """The CPU choice for this setting, from the cache or measured now (and cached)."""
    bf16 = cpu_supports_bf16() and (mode == "train" or BACKBONES[backbone].cpu_bf16_infer)
    key = (f"{cpu_identity()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {backbone} | {mode} | "
           f"{image_size} px | batch {batch_size} | {'fp32, bf16' if bf16 else 'fp32'}")
    cache = config.CACHE_DIR / PRECISION_CACHE_NAME
    known = _read_cache(cache)
    entry = known.get(key)
    if not _valid_entry(entry):
        rates = measure_executions(backbone, mode, image_size, batch_size, bf16)
        entry = {"choice": asdict(pick_execution(rates)), "rates": {str(e): r for e, r in rates.items()}}
        known[key] = entry
        try:
            atomic_write_text(cache, json.dumps(known, indent=1))
        except OSError as e:  # a cache that cannot be written costs a measurement next time, nothing more
            warnings.warn(f"precision choice not cached: {e}", stacklevel=3)
    choice = Execution(**entry["choice"])
    if key not in _reported:
        _reported.add(key)
        speeds = ", ".join(f"{name} {rate:.1f}" for name, rate in entry["rates"].items())
        print(f"precision auto ({backbone}, {mode}, {image_size} px, batch {batch_size}): {choice}; "
              f"measured img/s: {speeds}", file=sys.stderr)  # stdout stays the predictions (and valid --json)
    return choice


def pick_execution(rates: dict[Execution, float]) -> Execution:
    """The fastest fp32 layout, or the fastest bf16 one if it beats that by ``BF16_MARGIN``."""
    fp32 = max((e for e in rates if e.precision == "fp32"), key=rates.get)
    bf16 = [e for e in rates if e.precision == "bf16"]
    best_bf16 = max(bf16, key=rates.get) if bf16 else None
    return best_bf16 if best_bf16 and rates[best_bf16] >= BF16_MARGIN * rates[fp32] else fp32


def measure_executions(backbone: str, mode: str, image_size: int, batch_size: int,
                       bf16: bool = True) -> dict[Execution, float]:
    """Images per second of ``mode`` steps of a random-init ``backbone`` per candidate (median of the timed steps).

    The candidates run in turns: one warm-up round, then ``PROBE_STEPS`` timed rounds. After the first
    timed round only the faster memory format of each precision goes on (``fastest_layouts``): the choice
    is between those two, and the losers' single step already says they lost, so the probe costs about
    a third less. The global random state is left as it was, so measuring never changes a seeded run.
    """
    candidates = [Execution(p, cl) for p in (("fp32", "bf16") if bf16 else ("fp32",)) for cl in (False, True)]
    cpu = torch.device("cpu")
    times = {e: [] for e in candidates}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        runs = {}
        for e in candidates:
            fmt = torch.channels_last if e.channels_last else torch.contiguous_format
            model = build_model(backbone, 4, weights="none").to(memory_format=fmt).train(mode == "train")
            runs[e] = model, torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=fmt)
        for round_ in range(1 + PROBE_STEPS):  # in turns, so a change in the machine's load hits every candidate alike
            for e, (model, x) in runs.items():
                times[e].append(_timed_step(model, x, e.precision, cpu, mode == "train"))
            if round_ == 1:
                runs = {e: runs[e] for e in fastest_layouts(times)}
    return {e: batch_size / statistics.median(t[1:]) for e, t in times.items()}  # the first round warms up


def fastest_layouts(times: dict[Execution, list[float]]) -> list[Execution]:
    """Per precision, the memory format whose last timed step was the fastest (what the probe goes on timing)."""
    best: dict[str, Execution] = {}
    for e, t in times.items():
        if e.precision not in best or t[-1] < times[best[e.precision]][-1]:
            best[e.precision] = e
    return list(best.values())


def _timed_step(model: nn.Module, x: torch.Tensor, precision: str, device: torch.device, train: bool) -> float:
    start = time.perf_counter()
    with (nullcontext() if train else torch.inference_mode()), autocast(device, precision):
        out = model(x).float()  # (B, 4)
    if train:
        out.mean().backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _read_cache(path: Path) -> dict:
    try:
        known = json.loads(path.read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or damaged: measured again


def _valid_entry(entry) -> bool:
    try:
        Execution(**entry["choice"])
        return entry["choice"]["precision"] in ("fp32", "bf16") and all(r > 0 for r in entry["rates"].values())
    except (KeyError, TypeError, AttributeError):
        return False


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_identity() -> str:
    """The CPU that measured choices are cached for: its model name, vector extension and native bf16 (one
    model name, e.g. "AMD EPYC", covers CPUs with and without bf16, whose fastest settings differ)."""
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}{', bf16' if cpu_supports_bf16() else ''})"


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32 and for an int8 model)."""
    if precision in ("fp32", "int8"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
