"""pytest setup for tests/ and notebooks/ (nbval): outputs go to a temporary folder, never to models/ or reports/.

It lives at the repository root so that ``pytest notebooks/`` picks it up as well as ``pytest tests/``.
``make test`` runs most tests on two pytest-xdist workers (``-n 2``): each worker writes into a folder
of its own and gets its share of the cores, one file's tests stay together on one worker in file order,
and the notebooks run on one worker in their numbered order (03 and 04 read the model that 02 wrote).
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_VARS = (("AIMONK_MODELS_DIR", "models"), ("AIMONK_REPORTS_DIR", "reports"), ("AIMONK_CACHE_DIR", "cache"))
_OWN = "AIMONK_TEST_OUTPUTS"  # set when this file chose the folders (not the user), so workers may choose theirs
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
    # Keep it there: after that file, a process that forks DataLoader workers can die
    # (`pytest tests/test_export.py tests/test_benchmark_speed.py::test_speed_tuning_runs` died in the
    # tuner's `num_workers=2` loader in 2 of 4 runs), and one `pytest -n 2` run of everything, with test_export.py
    # handed out last, lost a worker near its end and then hung.
    os.environ.setdefault("AIMONK_RUNTIME", "torch")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        _share_cores(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    if worker and _OWN in os.environ:  # the folders the controller chose, not the user: this worker takes its own
        for var, _ in _VARS:
            os.environ.pop(var, None)
    if all(var in os.environ for var, _ in _VARS):
        return  # the user's own folders, kept
    root = Path(tempfile.mkdtemp(prefix=f"aimonk-tests-{worker + '-' if worker else ''}"))
    _created.append(root)
    os.environ[_OWN] = str(root)
    for var, sub in _VARS:
        os.environ.setdefault(var, str(root / sub))


def _share_cores(workers: int) -> None:
    """This worker's share of the cores, for torch here and for the subprocesses and kernels it starts."""
    share = max(1, (os.cpu_count() or 1) // workers)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(share)
    import torch  # (already imported by tests/conftest.py, too early for the variables above)

    torch.set_num_threads(share)


def pytest_unconfigure(config):
    for root in _created:
        shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist (extra "test")
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n``: one file's tests to one worker, in file order, and every notebook to one worker, in order."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return "notebooks" if path.endswith(".ipynb") else path

    return ByFile(config, log)
