"""Timing and memory primitives of the benchmarks: synchronised timers, races in turns, peak RSS, FLOPs."""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from aimonk.model import build_model


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    """Call ``fn`` between two device synchronisations.

    Returns:
        ``(fn's result, seconds)``.
    """
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def rate(images: int, seconds: float) -> float:
    """Images per second (NaN for no time)."""
    return images / seconds if seconds > 0 else float("nan")


def race(runs: dict[str, Callable], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Call every variant once (first call: warm-up, compilation), then ``rounds`` times in turns.

    Returns:
        Seconds per call for each variant; element 0 is the first call.
    """
    times = {k: [timed(fn, device)[1]] for k, fn in runs.items()}
    for _ in range(rounds):
        for k, fn in runs.items():
            times[k].append(timed(fn, device)[1])
    return times


def steady_rate(times: list[float], images: int) -> float:
    """img/s from the median of the calls after the first."""
    return rate(images, statistics.median(times[1:] or times))


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), to say how busy the machine was."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- memory


def current_rss() -> int | None:
    """The process's resident memory now, in bytes (None where it cannot be read)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
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
    phase edges (a lower bound). There is deliberately no sampling thread: on a shared machine with
    few cores, one waking every 10 ms slowed the bf16 training step it was meant to observe.
    """

    def __init__(self):
        self.peaks: dict[str, int] = {}
        self.exact = _reset_peak_rss() and _peak_rss_since_reset() is not None

    @contextmanager
    def phase(self, label: str):
        start = _reset_peak_rss() if self.exact else current_rss()
        try:
            yield
        finally:
            peak = _peak_rss_since_reset() if self.exact else max(start or 0, current_rss() or 0)
            self.peaks[label] = max(self.peaks.get(label, 0), peak or 0)


# --------------------------------------------------------------------------- FLOPs


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
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def forward_flops(backbone: str, num_attributes: int, image_size: int) -> float:
    """FLOPs of one forward pass on one image (2 FLOP per multiply-add), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(backbone, num_attributes, weights="none").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())
