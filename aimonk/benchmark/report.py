"""Benchmark results as files: what each JSON records about its run, and the markdown generated from it.

``python -m aimonk.benchmark report [--dir reports/benchmarks] [--check]``

Every ``*.json`` under the folder was written by ``python -m aimonk.benchmark speed|quality --json``.
This command writes a short markdown table beside each (same name, ``.md``) and the summary table
``summary.md`` that the README quotes. Nobody edits those files: rerun a benchmark, then this command.
``--check`` writes nothing and fails when a committed markdown file differs from what it would write.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import aimonk

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "reports" / "benchmarks"
"""Where the committed benchmark JSON files live."""


# ---------------------------------------------------------------- what a JSON records about its run

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files under aimonk/ differ from it."""
    root = Path(aimonk.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "aimonk"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def run_info(benchmark: str, argv: list[str]) -> dict:
    """Describe one benchmark run: the machine, the versions, the command and the date.

    Args:
        benchmark: the benchmark's command name, ``speed`` or ``quality``.
        argv: the arguments after the command name, as given.

    Returns:
        A JSON-ready dict with ``machine``, ``versions``, ``command`` and ``date`` (UTC, ISO 8601).
    """
    import torch

    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "system": f"{platform.system()} {platform.release()}",
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": _version("torchvision"), "numpy": _version("numpy"),
                "aimonk": aimonk.__version__, "git_commit": _git_commit()}
    return {"machine": machine, "versions": versions,
            "command": shlex.join(["python", "-m", "aimonk.benchmark", benchmark, *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
