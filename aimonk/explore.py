"""Dataset health: counts, image modes and sizes, byte-identical duplicates and label summaries.

``01_explore`` calls these; each returns plain pandas objects so a test can check them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from aimonk.data import (
    DatasetIndex,
    ImageLoadError,
    file_digest,
    index_dataset,
    load_image,
    make_split,
    read_reason,
    shown,
)
from aimonk.losses import compute_pos_weight


def label_token(value: float) -> str:
    """How a stored label reads in labels.txt: ``1``, ``0`` or ``NA``."""
    return "NA" if value < 0 else str(int(value))


def describe_image(path: str | os.PathLike) -> dict:
    """Mode, format, size, bytes and sha256 of one image file, and whether it decodes.

    Returns:
        ``{"name", "mode", "format", "width", "height", "bytes", "digest", "error"}``; ``error`` is
        ``""`` for a readable image, else the reason (the same check training applies).
    """
    path = Path(path)
    row = {"name": path.name, "mode": "", "format": "", "width": 0, "height": 0, "bytes": 0, "digest": "", "error": ""}
    try:  # the file may have gone or become unreadable since the dataset was indexed
        row.update(bytes=path.stat().st_size, digest=file_digest(path))
    except (ImageLoadError, OSError) as e:
        row["error"] = str(e) if isinstance(e, ImageLoadError) else f"{shown(path)}: cannot read it: {read_reason(e)}"
        return row
    try:
        with Image.open(path) as img:  # header only: cheap
            row.update(mode=img.mode, format=img.format or "", width=img.width, height=img.height)
    except Exception:  # unreadable headers are reported by load_image below
        pass
    try:
        load_image(path)
    except ImageLoadError as e:
        row["error"] = str(e)
    return row


def image_table(paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None,
                workers: int = 2) -> pd.DataFrame:
    """One row per image file: mode, format, width, height, bytes, digest and decode error.

    Args:
        paths: image files.
        names: row labels (default: the file names); pass labels.txt names to keep subfolders.
        workers: decoding threads (PIL releases the GIL while decoding).
    Returns:
        A DataFrame indexed by name.
    """
    with ThreadPoolExecutor(max(1, workers)) as pool:
        rows = list(pool.map(describe_image, paths))
    df = pd.DataFrame(rows, columns=["name", "mode", "format", "width", "height", "bytes", "digest", "error"])
    if names is not None:
        df["name"] = list(names)
    return df.set_index("name")


def mode_summary(images: pd.DataFrame) -> pd.DataFrame:
    """Counts per (format, mode), e.g. to spot grayscale or palette images that get converted to RGB.

    A file whose header cannot be read shows as format and mode ``"?"``.
    """
    known = images[["format", "mode"]].replace("", "?")
    return (known.groupby(["format", "mode"]).size().rename("images").reset_index()
            .sort_values("images", ascending=False, ignore_index=True))


def size_summary(images: pd.DataFrame) -> pd.DataFrame:
    """Distribution (count, min, quartiles, max) of width, height, aspect ratio and file size in KiB."""
    ok = images[images["width"] > 0]
    stats = pd.DataFrame({
        "width": ok["width"], "height": ok["height"],
        "aspect (w/h)": ok["width"] / ok["height"], "KiB": ok["bytes"] / 1024,
    })
    return stats.describe().T[["count", "min", "25%", "50%", "75%", "max"]].round(2)


def find_duplicates(index: DatasetIndex, digests: Sequence[str] | None = None) -> pd.DataFrame:
    """Byte-identical labelled images and whether their labels conflict.

    Labels conflict when some attribute is known (1 or 0) in two copies and differs; an NA next
    to a known label is not a conflict.

    Args:
        index: the dataset, from ``index_dataset``.
        digests: sha256 per row of ``index`` (computed if omitted).
    Returns:
        One row per image in a duplicate group: ``group`` (1, 2, ...), ``name``, one column per
        attribute with the labels as written, ``conflict`` (for the whole group) and
        ``conflicting`` (the attributes that disagree). Empty, with those columns, if none.
    """
    digests = list(digests) if digests is not None else [file_digest(p) for p in index.paths]
    attributes = index.attributes
    columns = ["group", "name", *attributes, "conflict", "conflicting"]
    by_digest: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        if d:  # "" marks a file that could not be read
            by_digest.setdefault(d, []).append(i)
    rows = []
    groups = [rows_ for rows_ in by_digest.values() if len(rows_) > 1]
    for g, members in enumerate(sorted(groups, key=lambda m: m[0]), start=1):
        t = index.table.targets[members]  # (copies, n_attributes)
        known = t >= 0
        bad = [a for j, a in enumerate(attributes) if len(set(t[known[:, j], j].tolist())) > 1]
        for i in members:
            rows.append({"group": g, "name": index.table.names[i],
                         **{a: label_token(v) for a, v in zip(attributes, index.table.targets[i])},
                         "conflict": bool(bad), "conflicting": ", ".join(bad)})
    return pd.DataFrame(rows, columns=columns)


def label_counts(targets: np.ndarray, attributes: Sequence[str]) -> pd.DataFrame:
    """Per attribute: how many labels are 1, 0 and NA, the share of NA, and the positive rate among known labels."""
    t = np.asarray(targets)
    pos, neg, na = (t == 1).sum(0), (t == 0).sum(0), (t < 0).sum(0)
    known = np.maximum(pos + neg, 1)
    return pd.DataFrame({
        "1": pos, "0": neg, "NA": na,
        "NA share": na / max(len(t), 1),
        "positive rate (known)": np.where(pos + neg > 0, pos / known, np.nan),
    }, index=pd.Index(list(attributes), name="attribute")).round(3)


def label_string(row: np.ndarray, attributes: Sequence[str]) -> str:
    """A short caption for one image's labels, e.g. ``"Attr1 Attr4 | NA: Attr2"`` (present, then unknown)."""
    present = [a for a, v in zip(attributes, row) if v == 1]
    unknown = [a for a, v in zip(attributes, row) if v < 0]
    text = " ".join(present) if present else "none present"
    return text + (f" | NA: {' '.join(unknown)}" if unknown else "")


@dataclass
class DatasetHealth:
    """Everything ``dataset_health`` found out about a data folder."""

    index: DatasetIndex  # labels.txt matched against images/
    images: pd.DataFrame  # one row per labelled image that exists (see ``image_table``)
    duplicates: pd.DataFrame  # byte-identical groups (see ``find_duplicates``)

    @property
    def readable(self) -> np.ndarray:
        """Row indices (into ``index.table``) of images that decode; training uses exactly these."""
        return np.flatnonzero(self.images["error"].to_numpy() == "")

    @property
    def targets(self) -> np.ndarray:
        """Labels (N_usable, n_attributes) of the usable images, -1 for NA."""
        return self.index.table.targets[self.readable]

    @property
    def unreadable(self) -> pd.DataFrame:
        """Name and reason for each labelled image that does not decode."""
        return self.images.loc[self.images["error"] != "", ["error"]]

    def counts(self) -> pd.DataFrame:
        """Rows, images present, missing, unlisted, unreadable, usable and duplicate groups, as one table."""
        n_groups = self.duplicates["group"].nunique()
        n_conflict = self.duplicates.loc[self.duplicates["conflict"], "group"].nunique()
        items = {
            "rows in labels.txt": len(self.index.table) + len(self.index.missing) + len(self.index.unreadable),
            "images present (labelled)": len(self.index.table) + len(self.index.unreadable),
            "labelled but missing": len(self.index.missing),
            "unlisted images (ignored)": len(self.index.unlisted),
            "unreadable images (skipped)": len(self.unreadable) + len(self.index.unreadable),
            "usable images": len(self.readable),
            "byte-identical groups": n_groups,
            "... with conflicting labels": n_conflict,
        }
        return pd.DataFrame({"count": list(items.values())}, index=pd.Index(list(items), name="what"))

    def duplicate_message(self) -> str:
        """A plain (Markdown) sentence on duplicates; a label-quality warning when copies disagree."""
        d = self.duplicates
        if d.empty:
            return "No byte-identical images among the labelled files."
        n_groups, bad = d["group"].nunique(), d[d["conflict"]]
        if bad.empty:
            return (f"{n_groups} group(s) of byte-identical images, all labelled consistently. "
                    "Training keeps each group on one side of the train/validation split.")
        n_bad = bad["group"].nunique()
        attrs = sorted({a for s in bad["conflicting"] for a in s.split(", ")})
        return (f"**Label-quality warning:** {n_bad} of {n_groups} group(s) of byte-identical images carry "
                f"conflicting labels (on {', '.join(attrs)}). The same pixels cannot be both 1 and 0, so at "
                "least one label in each such group is wrong; expect label noise of this kind elsewhere too. "
                "Training keeps each group on one side of the train/validation split.")

    def label_counts(self) -> pd.DataFrame:
        """``label_counts`` over the usable images."""
        return label_counts(self.targets, self.index.attributes)

    def training_pos_weight(self, val_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
        """The ``pos_weight`` that training with these settings will use, next to the all-data value.

        Training splits the usable images exactly like this (grouped by content hash, stratified)
        and counts ``negatives / positives`` over the known labels of its training part.
        """
        ok = self.readable
        targets = self.index.table.targets[ok]
        digests = self.images["digest"].to_numpy()[ok]
        train = np.arange(len(ok))
        if val_fraction > 0:
            train, _ = make_split(targets, list(digests), val_fraction, seed)
        attributes = self.index.attributes
        return pd.DataFrame({
            "pos_weight (training split)": compute_pos_weight(targets[train], attributes).numpy(),
            "pos_weight (all usable)": compute_pos_weight(targets, attributes).numpy(),
        }, index=pd.Index(list(attributes), name="attribute")).round(3)

    def sample(self, n: int = 12, seed: int = 0, thumb: int = 160) -> tuple[list[Image.Image], list[str]]:
        """``n`` random usable images (as thumbnails) with captions ``name`` / labels, for ``plot_image_grid``."""
        ok = self.readable
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(ok, size=min(n, len(ok)), replace=False))
        images, titles = [], []
        for i in pick:
            img = load_image(self.index.paths[i], draft_size=thumb)
            img.thumbnail((thumb, thumb))
            images.append(img)
            titles.append(f"{self.index.table.names[i]}\n{label_string(self.index.table.targets[i], self.index.attributes)}")
        return images, titles


def dataset_health(data_dir: str | os.PathLike, workers: int = 2) -> DatasetHealth:
    """Check a data folder: match labels to images, describe and decode every image, find duplicates.

    Args:
        data_dir: folder with ``labels.txt`` and ``images/``.
        workers: decoding threads.
    Returns:
        A ``DatasetHealth``.
    """
    index = index_dataset(data_dir, warn=False)  # missing images are listed in ``counts`` instead
    images = image_table(index.paths, index.table.names, workers=workers)
    duplicates = find_duplicates(index, images["digest"].tolist())
    return DatasetHealth(index=index, images=images, duplicates=duplicates)
