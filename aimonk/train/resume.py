"""Kill-and-resume: the per-epoch state beside the checkpoint, saved atomically and read back checked."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from torch import nn

from aimonk import distributed
from aimonk.files import CheckpointError, atomic_write_bytes, safe_load, torch_bytes
from aimonk.train.config import TrainConfig
from aimonk.train.loop import TrainingError

# Settings that may change between a run and its resumption: they do not change the result.
NOT_RESUMABLE_KEYS = ("resume", "progress", "num_workers", "cache_dir", "loss_plot")


def resume_path(out: str | os.PathLike) -> Path:
    """Where the per-epoch resumable state for ``out`` lives."""
    out = Path(out)
    return out.with_name(out.stem + ".resume" + out.suffix)


def resumable_config(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the run that saved the state."""
    d = asdict(cfg)
    for k in NOT_RESUMABLE_KEYS:
        d.pop(k)
    return d


def state_bytes(cfg: TrainConfig, epoch: int, history: dict, model: nn.Module, optimizer, scheduler, ema,
                best_ap: float, best_state: dict | None) -> bytes:
    """The state after ``epoch`` epochs, serialised: a snapshot that later steps do not change."""
    return torch_bytes({
        "config": resumable_config(cfg), "epoch": epoch, "history": history,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "best_ap": best_ap, "best_state": best_state,
    })


class StateWriter:
    """Writes each epoch's state (serialised at once, in the training thread) in a background thread, so
    that the write and its fsync overlap the next epoch instead of stalling it.

    One write at a time: ``write`` first waits for the one before and raises its error. ``close`` does the
    same for the last write; ``run_epochs`` calls it before leaving, on success or failure, so a finished or
    failed run has its last state on disk, as with a write in line.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aimonk-state")
        self._pending: Future | None = None

    def write(self, path: Path, data: bytes) -> None:
        self.wait()
        self._pending = self._pool.submit(atomic_write_bytes, path, data)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # the write's own error (an OSError naming the file)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def load_state(path: Path, cfg: TrainConfig, model: nn.Module, optimizer, scheduler, ema) -> dict:
    """Restore model, optimizer, schedule and EMA from ``path`` (rank 0's file, sent to every process).

    Returns:
        ``{"epoch", "history", "best_ap", "best_state"}``.
    Raises:
        TrainingError: naming the file, if it is damaged or was saved with another configuration.
    """
    try:
        state = distributed.from_main(lambda: safe_load(path))
    except CheckpointError as e:
        raise TrainingError(f"{e}; delete it or drop resume") from None
    saved = state.get("config") if isinstance(state, dict) else None
    if saved != resumable_config(cfg):
        changed = sorted(k for k, v in resumable_config(cfg).items() if (saved or {}).get(k) != v)
        raise TrainingError(f"{path}: saved with a different configuration ({', '.join(changed)}); "
                            "delete it or drop resume")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        return {k: state[k] for k in ("epoch", "history", "best_ap", "best_state")}
    except (KeyError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainingError(f"{path}: cannot resume from it ({first[:200]}); delete it or drop resume") from None
