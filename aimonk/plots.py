"""Figures for the notebooks and the CLI (seaborn/matplotlib). Each returns a ``Figure``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from aimonk import config
from aimonk.files import atomic_savefig


def save(fig: Figure, name: str, folder: str | Path = config.FIGURES_DIR) -> Path:
    """Save ``fig`` as ``folder/name`` (PNG), atomically, and return the path."""
    return atomic_savefig(fig, Path(folder) / name, dpi=120, bbox_inches="tight")


def plot_loss_curve(losses: Sequence[float], steps_per_epoch: int | None = None) -> Figure:
    """Training loss per iteration, with a running mean and epoch boundaries."""
    fig, ax = plt.subplots(figsize=(8, 4))
    it = np.arange(1, len(losses) + 1)
    ax.plot(it, losses, lw=0.8, alpha=0.45, label="per iteration")
    if len(losses) >= 5:
        w = max(1, min(steps_per_epoch or 10, len(losses) // 5))
        smooth = pd.Series(losses).rolling(w, min_periods=1).mean()
        ax.plot(it, smooth, lw=2, label=f"running mean ({w} it)")
    if steps_per_epoch:
        for e in range(steps_per_epoch, len(losses), steps_per_epoch):
            ax.axvline(e + 0.5, color="grey", lw=0.4, alpha=0.4)
    ax.set_xlabel(config.LOSS_PLOT_XLABEL)
    ax.set_ylabel(config.LOSS_PLOT_YLABEL)
    ax.set_title(config.LOSS_PLOT_TITLE)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_label_counts(counts: pd.DataFrame) -> Figure:
    """Stacked 1 / 0 / NA bars per attribute (``counts``: index attribute, columns '1', '0', 'NA')."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    counts[["1", "0", "NA"]].plot.bar(stacked=True, ax=ax, color=["#2a9d8f", "#e9c46a", "#bbbbbb"])
    ax.set_ylabel("images")
    ax.set_title("Label balance per attribute")
    ax.tick_params(axis="x", rotation=0)
    fig.tight_layout()
    return fig


def plot_na_pattern(targets: np.ndarray, attributes: Sequence[str], max_rows: int = 400) -> Figure:
    """Heatmap of which labels are NA (rows = images, first ``max_rows``)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    sns.heatmap((targets[:max_rows] < 0).astype(int), cbar=False, cmap="Greys", xticklabels=attributes,
                yticklabels=False, ax=ax)
    ax.set_ylabel("image")
    ax.set_title("NA pattern (black = unknown)")
    fig.tight_layout()
    return fig


def plot_cooccurrence(targets: np.ndarray, attributes: Sequence[str]) -> Figure:
    """P(column present | row present), over images where both labels are known."""
    n = len(attributes)
    m = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            both = (targets[:, i] >= 0) & (targets[:, j] >= 0) & (targets[:, i] == 1)
            if both.any():
                m[i, j] = (targets[both, j] == 1).mean()
    fig, ax = plt.subplots(figsize=(4.8, 4))
    sns.heatmap(m, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", xticklabels=attributes,
                yticklabels=attributes, ax=ax)
    ax.set_title("P(column = 1 | row = 1)")
    fig.tight_layout()
    return fig


def plot_image_sizes(sizes: pd.DataFrame) -> Figure:
    """Scatter of image width against height (``sizes``: columns width, height, mode)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    sns.scatterplot(data=sizes, x="width", y="height", hue="mode", alpha=0.6, ax=ax)
    ax.set_title("Image sizes")
    fig.tight_layout()
    return fig


def plot_image_grid(images, titles: Sequence[str], ncols: int = 6) -> Figure:
    """A grid of PIL images with captions."""
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.5 * nrows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, img, title in zip(np.ravel(axes), images, titles):
        ax.imshow(img)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


def plot_pr_curves(targets: np.ndarray, probs: np.ndarray, attributes: Sequence[str]) -> Figure:
    """Precision-recall curve per attribute with its positive rate (the AP of chance) dashed."""
    from sklearn.metrics import PrecisionRecallDisplay

    fig, axes = plt.subplots(1, len(attributes), figsize=(3.6 * len(attributes), 3.4), squeeze=False)
    for j, (a, ax) in enumerate(zip(attributes, axes[0])):
        m = targets[:, j] >= 0
        y, p = targets[m, j].astype(int), probs[m, j]
        if 0 < y.sum() < len(y):
            PrecisionRecallDisplay.from_predictions(y, p, ax=ax, name="model", plot_chance_level=True)
        ax.set_title(a)
        ax.set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def plot_confusion_matrices(targets: np.ndarray, pred: np.ndarray, attributes: Sequence[str]) -> Figure:
    """2x2 confusion matrix per attribute (NA excluded)."""
    from sklearn.metrics import confusion_matrix

    fig, axes = plt.subplots(1, len(attributes), figsize=(3 * len(attributes), 2.9), squeeze=False)
    for j, (a, ax) in enumerate(zip(attributes, axes[0])):
        m = targets[:, j] >= 0
        cm = confusion_matrix(targets[m, j].astype(int), pred[m, j].astype(int), labels=[0, 1])
        sns.heatmap(cm, annot=True, fmt="d", cbar=False, cmap="Blues", ax=ax,
                    xticklabels=["pred 0", "pred 1"], yticklabels=["true 0", "true 1"])
        ax.set_title(a)
    fig.tight_layout()
    return fig


def plot_threshold_sweep(sweep: pd.DataFrame, chosen: dict[str, float] | None = None) -> Figure:
    """Precision, recall and F1 against threshold per attribute, with the chosen threshold marked.

    Attributes missing from ``chosen`` (e.g. decided by the majority rule) get no marker.
    """
    long = sweep.melt(id_vars=["attribute", "threshold"], value_vars=["precision", "recall", "f1"], var_name="metric")
    g = sns.relplot(data=long, x="threshold", y="value", hue="metric", col="attribute", kind="line",
                    height=3, aspect=1.0, facet_kws={"sharey": True})
    if chosen:
        for a, ax in g.axes_dict.items():
            if a in chosen:
                ax.axvline(chosen[a], color="k", ls="--", lw=1)
    g.figure.suptitle("Threshold sweep on validation (dashed: chosen)", y=1.04)
    return g.figure


def plot_metric_bars(report: pd.DataFrame) -> Figure:
    """Model F1 against the majority baseline, and AP against the positive rate, per attribute."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    report[["f1", "majority_f1"]].plot.bar(ax=axes[0], rot=0, color=["#264653", "#e9c46a"])
    axes[0].set_title("F1: model vs majority baseline")
    report[["ap", "pos_rate"]].plot.bar(ax=axes[1], rot=0, color=["#264653", "#e9c46a"])
    axes[1].set_title("AP vs positive rate (chance AP)")
    for ax in axes:
        ax.set_ylim(0, 1)
    fig.tight_layout()
    return fig


def plot_batch(images, targets, attributes: Sequence[str], n: int = 12, ncols: int = 6) -> Figure:
    """The first ``n`` images of a batch as the model gets them, captioned with their labels.

    Args:
        images: uint8 (B, 3, S, S), augmented and not yet normalised.
        targets: (B, n_attributes) with 1, 0 or -1 (NA).
        attributes: the attribute names, in column order.
        n: how many images to show.
        ncols: images per row.
    Returns:
        The figure; each caption reads ``Attr1 1  Attr2 NA`` and so on.
    """
    pictures = list(np.asarray(images[:n]).transpose(0, 2, 3, 1))  # (n, S, S, 3)
    return plot_image_grid(pictures, [_label_caption(row, attributes) for row in np.asarray(targets[:n])], ncols)


def _label_caption(row: np.ndarray, attributes: Sequence[str]) -> str:
    parts = [f"{a} {'NA' if v < 0 else int(v)}" for a, v in zip(attributes, row)]
    return "\n".join("  ".join(parts[i:i + 2]) for i in range(0, len(parts), 2))  # two attributes a line


def plot_validation_ap(val_macro_ap: Sequence[float], best_epoch: int | None = None) -> Figure:
    """Validation macro AP after each epoch, with the epoch whose weights were kept marked.

    Args:
        val_macro_ap: one value per epoch (empty when nothing was held out).
        best_epoch: the epoch kept (1-based), or None when the last epoch's weights were saved.
    Returns:
        The figure.
    """
    fig, ax = plt.subplots(figsize=(8, 3.5))
    epochs = np.arange(1, len(val_macro_ap) + 1)
    ax.plot(epochs, val_macro_ap, marker="o", label="validation macro AP")
    if best_epoch:
        ax.axvline(best_epoch, color="k", ls="--", lw=1, label=f"kept: epoch {best_epoch}")
    if not len(val_macro_ap):
        ax.text(0.5, 0.5, "no validation images (val_fraction = 0)", ha="center", transform=ax.transAxes)
    ax.set_xticks(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("macro AP")
    ax.set_title("Validation macro AP per epoch")
    if len(val_macro_ap):
        ax.legend()
    fig.tight_layout()
    return fig
