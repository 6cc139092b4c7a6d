"""A dataset folder (``labels.txt`` + ``images/``) matched against its files, and the torch ``Dataset``."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aimonk.data.images import ImageLoadError
from aimonk.data.labels import LabelFileError, LabelTable, parse_labels
from aimonk.data.paths import open_regular_file, read_reason, shown


@dataclass
class DatasetIndex:
    """A dataset folder after matching labels.txt against images/."""

    root: Path
    table: LabelTable  # rows whose image exists
    paths: list[Path]  # image path per row of ``table``
    missing: list[str]  # names in labels.txt with no image file
    unlisted: list[str]  # image files that labels.txt does not mention
    unreadable: dict[str, str] = field(default_factory=dict)  # labelled name -> why its file cannot be read

    @property
    def attributes(self) -> list[str]:
        return self.table.attributes



def index_dataset(data_dir: str | os.PathLike, warn: bool = True,
                  labels_file: str | os.PathLike | None = None) -> DatasetIndex:
    """Match ``data_dir/labels.txt`` (or ``labels_file``) against ``data_dir/images/``.

    Rows whose image is missing are dropped with one warning listing them; rows whose file cannot be
    read (permission denied, a broken symbolic link, a FIFO or other non-regular file) are dropped
    with one warning giving each reason. Image files that no row mentions are counted and ignored;
    subfolders of ``images/`` that cannot be listed are skipped with a warning. Names in warnings are
    escaped (see ``shown``).

    Args:
        data_dir: folder holding ``labels.txt`` and ``images/``.
        warn: emit the missing- and unreadable-image warnings.
        labels_file: read the labels from this file instead of ``data_dir/labels.txt``, e.g. the
            ``labels.reviewed.txt`` that a label audit's review wrote (the images stay in ``data_dir``).
    Returns:
        A ``DatasetIndex``.
    Raises:
        FileNotFoundError: if the folder, ``labels.txt`` or ``images/`` does not exist.
        LabelFileError: if labels.txt is malformed or unreadable, or no row has a readable image.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{shown(root)}: data folder not found (expected labels.txt and images/ inside)")
    labels, images = Path(labels_file) if labels_file else root / "labels.txt", root / "images"
    if not os.path.lexists(labels):
        raise FileNotFoundError(f"{shown(labels)}: labels file not found")
    if not images.is_dir():
        raise FileNotFoundError(f"{shown(images)}: images folder not found")
    table = parse_labels(labels)  # also refuses a labels.txt that is a FIFO, a folder or unreadable
    present, paths, missing, unreadable = _match_images(table, labels, images)
    unlisted = _unlisted_images(images, set(table.names), warn)
    if missing and warn:
        shown_ = ", ".join(shown(n) for n in missing[:20]) + (" ..." if len(missing) > 20 else "")
        warnings.warn(f"{shown(labels)}: {len(missing)} labelled image(s) not found in {shown(images)}, "
                      f"skipped: {shown_}", stacklevel=2)
    if unreadable and warn:
        reasons = "; ".join(unreadable[n] for n in list(unreadable)[:20]) + (" ..." if len(unreadable) > 20 else "")
        warnings.warn(f"{shown(labels)}: {len(unreadable)} labelled image(s) cannot be read, skipped: {reasons}",
                      stacklevel=2)
    if not present:
        if unreadable:
            raise LabelFileError(f"{shown(labels)}: none of the {len(table)} labelled images in {shown(images)} can "
                                 f"be read ({len(missing)} missing, {len(unreadable)} unreadable)")
        raise LabelFileError(f"{shown(labels)}: none of the {len(table)} labelled images exist in {shown(images)}")
    return DatasetIndex(root=root, table=table.subset(present), paths=paths, missing=missing, unlisted=unlisted,
                        unreadable=unreadable)


def _match_images(table: LabelTable, labels: Path, images: Path):
    """``(present rows, their paths, missing names, {unreadable name: reason})``; refuses a name that
    leads outside ``images``. Each present file was opened once (non-blocking) to prove it readable."""
    images_resolved = Path(os.path.realpath(images))
    present, paths, missing, unreadable = [], [], [], {}
    for i, name in enumerate(table.names):
        p = Path(os.path.realpath(images / name))  # never raises, even on a symbolic link loop
        if images_resolved not in p.parents:  # symlink or odd name escaping images/
            raise LabelFileError(f"{shown(labels)} line {table.line_numbers[i]}: {name!r} points outside "
                                 f"{shown(images)}")
        if not os.path.lexists(images / name):
            missing.append(name)
            continue
        try:
            open_regular_file(images / name, ImageLoadError).close()
        except ImageLoadError as e:
            unreadable[name] = str(e)
            continue
        present.append(i)
        paths.append(images / name)
    return present, paths, missing, unreadable


def _unlisted_images(images: Path, listed: set[str], warn: bool) -> list[str]:
    """Files under ``images`` that labels.txt does not name (hidden files aside), sorted; a subfolder
    that cannot be listed is skipped, with a warning naming it."""
    found, unlistable = [], []
    for folder, _, files in os.walk(images, onerror=unlistable.append):
        for f in files:
            rel = Path(folder, f).relative_to(images).as_posix()
            if not f.startswith(".") and rel not in listed and os.path.isfile(os.path.join(folder, f)):
                found.append(rel)
    if unlistable and warn:
        listed_ = "; ".join(f"{shown(e.filename)} ({read_reason(e)})" for e in unlistable[:20])
        warnings.warn(f"{shown(images)}: {len(unlistable)} subfolder(s) cannot be listed, their files are not "
                      f"counted: {listed_}", stacklevel=3)
    return sorted(found)



class ImageDataset(torch.utils.data.Dataset):
    """Decoded uint8 images plus targets; augmentation runs on the uint8 tensors.

    Each item is ``(image, target)`` with image uint8 (3, S, S) and target float32 (n_attributes,)
    holding -1 for NA. ``images`` is anything indexable giving uint8 arrays, e.g. a ``DecodedCache``.
    """

    def __init__(self, images, targets: np.ndarray, transform=None):
        self.images = images
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.array(self.images[i], dtype=np.uint8, copy=True))
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i]

