"""Scoring a labelled folder with a checkpoint: the probabilities that notebook 03 and the CLI's
``evaluate`` turn into metrics (``aimonk.metrics``)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from aimonk.cache import DecodedCache
from aimonk.data import ImageDataset, index_dataset
from aimonk.inference import Predictor


def _labelled_rows(predictor, data_dir: str | os.PathLike, names: Sequence[str] | None,
                   labels: str | os.PathLike | None = None):
    """``(index, rows)``: the folder's index (labels from ``labels``, default labels.txt) and the rows of
    ``names`` (all rows if None), checked against the labels and the model's attributes."""
    index = index_dataset(data_dir, labels_file=labels or None)
    if len(index.attributes) != len(predictor.attributes):
        raise ValueError(f"{data_dir}: {len(index.attributes)} attributes, but {predictor.path} predicts "
                         f"{len(predictor.attributes)}")
    if names is None:
        return index, list(range(len(index.table)))
    where = {n: i for i, n in enumerate(index.table.names)}
    absent = [n for n in names if n not in where]
    if absent:
        raise ValueError(f"{index.table.source}: {len(absent)} split image(s) not listed, e.g. {absent[:3]}")
    return index, [where[n] for n in names]


def score_folder(model_path: "str | os.PathLike | Predictor", data_dir: str | os.PathLike,
                 names: Sequence[str] | None = None, cache_dir: str | None = None, progress: bool = False,
                 tta: bool | None = None, labels: str | os.PathLike | None = None, runtime: str | None = None):
    """Probabilities of a checkpoint on a labelled folder (optionally only the rows in ``names``).

    ``model_path`` is a checkpoint path or a loaded ``Predictor``. ``tta`` (flip test-time
    augmentation) defaults to the checkpoint's own setting. ``labels`` replaces ``data_dir/labels.txt``
    (e.g. a reviewed labels file). ``runtime`` is the ``Predictor``'s for a path (None: its default).

    Returns:
        ``(targets, probs, names, predictor)`` for the readable, present images.
    """
    predictor = model_path if isinstance(model_path, Predictor) else Predictor(model_path, runtime=runtime)
    index, rows = _labelled_rows(predictor, data_dir, names, labels)
    cache = DecodedCache([index.paths[i] for i in rows], predictor.image_size, cache_dir, progress=progress)
    ok = cache.ok
    ds = ImageDataset(torch.utils.data.Subset(cache, ok), index.table.targets[[rows[i] for i in ok]])
    probs = predictor.dataset_probabilities(ds, tta=tta)
    return ds.targets.numpy(), probs, [index.table.names[rows[i]] for i in ok], predictor


def validation_scores(model_path: str | os.PathLike, data_dir: str | os.PathLike, names: Sequence[str],
                      cache_dir: str | None = None, progress: bool = False, tta: bool | None = None,
                      labels: str | os.PathLike | None = None, runtime: str | None = None):
    """Probabilities of a checkpoint on its validation images, for choosing decisions honestly.

    A model trained with ``probe_cross_fit`` has seen the validation images (its probe was refitted on
    them), so scoring them again would flatter it. Its checkpoint stores out-of-fold scores instead
    (``CheckpointMeta.validation_scores``, from probes that did not see the image scored), and those are
    returned. Any other checkpoint is scored as ``score_folder`` does, on ``runtime``.

    Returns:
        ``(targets, probs, names, predictor)`` like ``score_folder``.
    """
    predictor = Predictor(model_path, runtime=runtime)
    stored = predictor.meta.validation_scores
    if not stored:
        return score_folder(predictor, data_dir, names=names, cache_dir=cache_dir, progress=progress, tta=tta,
                            labels=labels)
    tta = predictor.meta.tta if tta is None else tta
    probs = stored["flip_tta" if tta else "plain"]
    if probs is None:
        raise ValueError(f"{model_path} stores its validation scores without flip TTA only; pass tta=False")
    where = {n: i for i, n in enumerate(stored["names"])}
    unknown = [n for n in names if n not in where]
    if unknown:
        raise ValueError(f"{model_path} has seen these images and stores no out-of-fold scores for "
                         f"{len(unknown)} of them, e.g. {unknown[:3]}: score only its own validation split")
    index, rows = _labelled_rows(predictor, data_dir, names, labels)
    targets = index.table.targets[rows]
    return targets, np.asarray([probs[where[n]] for n in names], np.float32), list(names), predictor
