"""pytest setup for tests/ and notebooks/ (nbval): outputs go to a temporary folder, never to models/ or reports/.

It lives at the repository root so that ``pytest notebooks/`` picks it up as well as ``pytest tests/``.
"""

import os
import shutil
import tempfile
from pathlib import Path

_VARS = (("AIMONK_MODELS_DIR", "models"), ("AIMONK_REPORTS_DIR", "reports"), ("AIMONK_CACHE_DIR", "cache"))
_created: list[Path] = []


def pytest_configure(config):
    # Runs before aimonk is imported (aimonk.config reads these once) and before nbval starts its
    # kernels, which inherit this environment, so the notebooks under test write here too.
    # nbval reads a kernel's messages only after each cell, and the kernel's IOPub queue drops what
    # exceeds its high-water mark (1000), the final "idle" included; per-batch progress-bar widget
    # updates over a 20-epoch training cell come close to that. Fewer updates keep it well below.
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    # Tests and notebooks under test run models on torch, the reference, unless a test asks for another
    # runtime: ONNX Runtime and OpenVINO load only in tests/test_export.py (marked "deploy"), which
    # `make test` runs in a pytest process of its own, and which checks the default, auto, itself.
    os.environ.setdefault("AIMONK_RUNTIME", "torch")
    if all(var in os.environ for var, _ in _VARS):
        return
    root = Path(tempfile.mkdtemp(prefix="aimonk-tests-"))
    _created.append(root)
    for var, sub in _VARS:
        os.environ.setdefault(var, str(root / sub))


def pytest_unconfigure(config):
    for root in _created:
        shutil.rmtree(root, ignore_errors=True)
