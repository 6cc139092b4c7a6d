"""A dataset folder (``labels.txt`` + ``images/``) matched against its files, and the torch ``Dataset``."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aimonk.data.labels import LabelFileError, LabelTable, parse_labels


@dataclass
class DatasetIndex:
    """A dataset folder after matching labels.txt against images/."""

    root: Path
    table: LabelTable  # rows whose image exists
    paths: list[Path]  # image path per row of ``table``
    missing: list[str]  # names in labels.txt with no image file
    unlisted: list[str]  # image files that labels.txt does not mention

    @property
    def attributes(self) -> list[str]:
        return self.table.attributes



def index_dataset(data_dir: str | os.PathLike, warn: bool = True) -> DatasetIndex:
    """Match ``data_dir/labels.txt`` against ``data_dir/images/``.

    Rows whose image is missing are dropped with one warning listing them. Image files that no
    row mentions are counted and ignored.

    Args:
        data_dir: folder holding ``labels.txt`` and ``images/``.
        warn: emit the missing-images warning.
    Returns:
        A ``DatasetIndex``.
    Raises:
        FileNotFoundError: if the folder, ``labels.txt`` or ``images/`` does not exist.
        LabelFileError: if labels.txt is malformed, or no row has an image.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found (expected labels.txt and images/ inside)")
    labels, images = root / "labels.txt", root / "images"
    if not labels.is_file():
        raise FileNotFoundError(f"{labels}: labels file not found")
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: images folder not found")
    table = parse_labels(labels)
    images_resolved = images.resolve()
    present, paths, missing = [], [], []
    for i, name in enumerate(table.names):
        p = (images / name).resolve()
        if images_resolved not in p.parents:  # symlink or odd name escaping images/
            raise LabelFileError(f"{labels} line {table.line_numbers[i]}: {name!r} points outside {images}")
        if p.is_file():
            present.append(i)
            paths.append(images / name)
        else:
            missing.append(name)
    listed = set(table.names)
    unlisted = sorted(
        str(p.relative_to(images))
        for p in images.rglob("*")
        if p.is_file() and not p.name.startswith(".") and str(p.relative_to(images)) not in listed
    )
    if missing and warn:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        warnings.warn(f"{labels}: {len(missing)} labelled image(s) not found in {images}, skipped: {shown}", stacklevel=2)
    if not present:
        raise LabelFileError(f"{labels}: none of the {len(table)} labelled images exist in {images}")
    return DatasetIndex(root=root, table=table.subset(present), paths=paths, missing=missing, unlisted=unlisted)



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

