"""Plain helpers shared by tests and by the child processes some tests start (``sys.path`` gets tests/)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"


def sample_subset(dst: Path, n: int = 12) -> Path:
    """The first ``n`` rows of the embedded sample whose image exists, copied to ``dst``."""
    rows = [line for line in (SAMPLE_DIR / "labels.txt").read_text().splitlines()
            if line.split() and (SAMPLE_DIR / "images" / line.split()[0]).is_file()][:n]
    (dst / "images").mkdir(parents=True)
    for line in rows:
        shutil.copy(SAMPLE_DIR / "images" / line.split()[0], dst / "images")
    (dst / "labels.txt").write_text("\n".join(rows) + "\n")
    return dst


def tiny_config(data: Path, out: Path, cache: Path, **overrides):
    """A ``TrainConfig`` that trains in seconds on the CPU: random init, 32 px, fp32, no plot, no progress."""
    from aimonk.train import TrainConfig

    values = dict(data_dir=str(data), out=str(out), loss_plot="", epochs=1, batch_size=4, image_size=32,
                  weights="none", precision="fp32", device="cpu", num_workers=0, cache_dir=str(cache), progress=False)
    return TrainConfig(**{**values, **overrides})


class AfterSteps:
    """Wraps a DataLoader so that ``action()`` runs once ``steps`` optimiser steps of the epoch are done
    (when the loop asks for the next batch): a crash or a stall in the middle of an epoch."""

    def __init__(self, loader, steps: int, action: Callable[[], None]):
        self.loader, self.steps, self.action = loader, steps, action

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader, start=1):
            yield batch
            if i == self.steps:
                self.action()


def stop_in_epoch(run_module, epoch: int, steps: int, action: Callable[[], None]) -> Callable:
    """A ``train_one_epoch`` for ``run_module`` (``aimonk.train.run``) whose (0-based) ``epoch`` runs
    ``action`` after ``steps`` optimiser steps; the other epochs run as usual."""
    import inspect

    original = run_module.train_one_epoch

    def patched(*args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        if bound.arguments["epoch"] == epoch:
            bound.arguments["loader"] = AfterSteps(bound.arguments["loader"], steps, action)
        return original(*bound.args, **bound.kwargs)

    return patched


def record_predictors(monkeypatch, module) -> list:
    """Replace ``module.Predictor`` with a subclass that records every instance, in order; returns that list."""
    made = []

    class Recorded(module.Predictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(module, "Predictor", Recorded)
    return made
