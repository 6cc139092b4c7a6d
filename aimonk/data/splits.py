"""Train/validation splits and cross-validation folds, grouped by content hash and stratified by labels."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from aimonk.files import atomic_write


def _stratify_key(targets: np.ndarray) -> np.ndarray:
    """One class per row from the rarest attribute (1 / 0 / NA), so every fold gets its positives."""
    known = targets >= 0
    pos_rate = np.where(known.sum(0) > 0, (targets == 1).sum(0) / np.maximum(known.sum(0), 1), 1.0)
    balance = np.minimum(pos_rate, 1 - pos_rate)
    rare = int(np.argmin(np.where(known.sum(0) > 0, balance, np.inf)))
    return targets[:, rare].astype(int) + 1  # 0 = NA, 1 = absent, 2 = present



def make_folds(targets: np.ndarray, groups: Sequence[str], n_folds: int, seed: int = 0) -> list[np.ndarray]:
    """Split rows into ``n_folds`` groups, keeping identical images together and stratifying on the rarest attribute.

    Args:
        targets: (N, n_attributes) array with -1 for NA.
        groups: a group id per row, e.g. the image content hash.
        n_folds: number of folds (>= 2).
        seed: shuffling seed.
    Returns:
        A list of ``n_folds`` index arrays (the held-out rows of each fold).
    """
    y = _stratify_key(targets)
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise ValueError(
            f"cannot make {n_folds} folds from {n_groups} distinct images; use more images "
            f"(or val_fraction=0 for no validation split)"
        )
    # Classes rarer than n_folds make sklearn warn; merging is harmless for the split itself.
    counts = np.bincount(y, minlength=3)
    y = np.where(counts[y] < n_folds, y.max(initial=0), y)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [test for _, test in splitter.split(np.zeros(len(y)), y, groups=list(groups))]



def make_split(
    targets: np.ndarray, groups: Sequence[str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``val_fraction`` of the rows, grouped and stratified as in ``make_folds``.

    Returns:
        ``(train_index, val_index)`` sorted index arrays.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_folds = max(2, round(1 / val_fraction))
    val = np.sort(make_folds(targets, groups, n_folds, seed)[0])
    train = np.setdiff1d(np.arange(len(targets)), val)
    return train, val



def save_split(path: str | os.PathLike, train_names: Sequence[str], val_names: Sequence[str], **meta) -> Path:
    """Write a split as JSON (``train`` and ``val`` name lists plus metadata), atomically."""
    with atomic_write(path, "w") as f:
        json.dump({**meta, "train": list(train_names), "val": list(val_names)}, f, indent=1)
    return Path(path)



def load_split(path: str | os.PathLike) -> dict:
    """Read a split written by ``save_split``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found; run the training step (02_train) first")
    return json.loads(path.read_text())

