"""Reading the dataset: the strict labels.txt parser, robust image loading, splits and the torch Dataset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from aimonk import config

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

NA = -1.0  # how an unknown label is stored in a target array


class LabelFileError(ValueError):
    """labels.txt is malformed; the message names the file and the line."""


class ImageLoadError(ValueError):
    """An image could not be decoded; the message names the image and the reason."""


# --------------------------------------------------------------------------- labels.txt


@dataclass
class LabelTable:
    """The parsed contents of a labels.txt file.

    ``targets`` has shape (N, n_attributes) and holds 1.0, 0.0 or -1.0 (NA).
    """

    names: list[str]
    targets: np.ndarray
    attributes: list[str]
    source: Path | None = None
    line_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: Sequence[int]) -> "LabelTable":
        index = list(index)
        return LabelTable(
            names=[self.names[i] for i in index],
            targets=self.targets[index],
            attributes=list(self.attributes),
            source=self.source,
            line_numbers=[self.line_numbers[i] for i in index] if self.line_numbers else [],
        )

    def counts(self) -> "dict[str, dict[str, int]]":
        """Per attribute, how many labels are 1, 0 and NA."""
        t = self.targets
        return {
            a: {"1": int((t[:, j] == 1).sum()), "0": int((t[:, j] == 0).sum()), "NA": int((t[:, j] < 0).sum())}
            for j, a in enumerate(self.attributes)
        }


def _parse_token(token: str) -> float | None:
    low = token.lower()
    if low in config.POSITIVE_TOKENS:
        return 1.0
    if low in config.NEGATIVE_TOKENS:
        return 0.0
    if low in config.NA_TOKENS:
        return NA
    return None


def _check_name(name: str, where: str) -> None:
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise LabelFileError(f"{where}: image name {name!r} is an absolute path; names must be relative to images/")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise LabelFileError(f"{where}: image name {name!r} contains '..'; names must stay inside images/")


def parse_labels(path: str | os.PathLike, attributes: Sequence[str] | None = None) -> LabelTable:
    """Parse a labels.txt file strictly.

    Each non-blank line is ``NAME t1 ... tK`` separated by any whitespace, where each token is
    ``1``, ``0`` or ``NA`` (``na``, ``NaN`` and ``N/A`` are accepted as NA). K comes from the file.
    An optional first line whose tokens are all non-label words (e.g. ``image Attr1 Attr2``) is a
    header and names the attributes. A UTF-8 byte-order mark and CRLF line endings are accepted.

    Args:
        path: the labels file.
        attributes: attribute names to use instead of the header or the default ``Attr1..AttrK``.
    Returns:
        A ``LabelTable``.
    Raises:
        LabelFileError: naming the file and line, for a wrong field count, an unknown token,
            a duplicate or unsafe image name, or a file with no label rows.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise LabelFileError(f"{path}: labels file not found") from None
    except UnicodeDecodeError as e:
        raise LabelFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    names: list[str] = []
    rows: list[list[float]] = []
    line_numbers: list[int] = []
    seen: dict[str, int] = {}
    header: list[str] | None = None
    n_labels: int | None = len(attributes) if attributes is not None else None
    lines = text.splitlines()
    # Without a header, the label count is the most common one (ties: the earliest), so that a bad
    # first line (e.g. a file name with a space) is the line reported, not every line after it.
    counts = Counter(len(raw.split()) - 1 for raw in lines if len(raw.split()) > 1)
    typical = next((len(raw.split()) - 1 for raw in lines
                    if len(raw.split()) > 1 and counts[len(raw.split()) - 1] == max(counts.values())), None)

    for lineno, raw in enumerate(lines, start=1):
        fields = raw.split()
        if not fields:
            continue
        where = f"{path} line {lineno}"
        name, tokens = fields[0], fields[1:]
        # A row naming an image file is data even if its tokens are all words (then they are bad labels).
        if not rows and header is None and tokens and PurePosixPath(name).suffix.lower() not in config.IMAGE_EXTENSIONS \
                and all(_parse_token(t) is None and not t.lstrip("+-").replace(".", "", 1).isdigit() for t in tokens):
            header = tokens  # e.g. "image Attr1 Attr2 Attr3 Attr4"
            if n_labels is not None and len(header) != n_labels:
                raise LabelFileError(f"{where}: header names {len(header)} attributes, expected {n_labels}")
            twice = sorted({a for a in header if header.count(a) > 1})
            if twice:
                raise LabelFileError(f"{where}: header names attribute(s) {twice} more than once; expected unique names")
            n_labels = len(header)
            continue
        if n_labels is None:
            if not tokens:
                raise LabelFileError(f"{where}: expected a file name followed by label tokens, got only {name!r}")
            n_labels = typical
        if len(tokens) != n_labels:
            hint = " (file names may not contain spaces)" if len(tokens) > n_labels else ""
            raise LabelFileError(
                f"{where}: expected {n_labels} labels after the file name, got {len(tokens)}{hint}: {raw.strip()!r}"
            )
        values = []
        for k, token in enumerate(tokens, start=1):
            v = _parse_token(token)
            if v is None:
                looks_like_name = Path(token).suffix.lower() in config.IMAGE_EXTENSIONS
                hint = " (file names may not contain spaces)" if looks_like_name else ""
                raise LabelFileError(f"{where}: label {k} is {token!r}; expected 1, 0 or NA{hint}")
            values.append(v)
        _check_name(name, where)
        if name in seen:
            raise LabelFileError(f"{where}: duplicate image name {name!r} (first seen on line {seen[name]})")
        seen[name] = lineno
        names.append(name)
        rows.append(values)
        line_numbers.append(lineno)

    if not rows:
        raise LabelFileError(f"{path}: no label rows found (expected lines like 'image_0.jpg 1 NA 0 1')")
    if attributes is None:
        attributes = header if header is not None else [f"Attr{j + 1}" for j in range(n_labels)]
    return LabelTable(
        names=names,
        targets=np.asarray(rows, dtype=np.float32),
        attributes=list(attributes),
        source=path,
        line_numbers=line_numbers,
    )


# --------------------------------------------------------------------------- images


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white, 16-bit is rescaled."""
    if getattr(img, "is_animated", False):
        img.seek(0)  # animated GIF/PNG: the first frame
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(source: ImageSource, name: str | None = None, draft_size: int | None = None) -> Image.Image:
    """Open an image as RGB, whatever its mode, with EXIF orientation applied.

    Args:
        source: a path, raw bytes, a binary file object or a PIL image.
        name: how to call the image in error messages (defaults to the path).
        draft_size: if given, JPEGs are decoded at reduced scale (never below this size) for speed.
    Returns:
        An RGB ``PIL.Image``.
    Raises:
        ImageLoadError: naming the image, when it is missing, empty, not an image, truncated,
            or larger than PIL's decompression-bomb limit.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<uploaded bytes>"
        if len(source) == 0:
            raise ImageLoadError(f"{label}: empty file (0 bytes)")
        fp: object = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        label = name or str(source)
        p = Path(source)
        if not p.is_file():
            raise ImageLoadError(f"{label}: no such image file")
        if p.stat().st_size == 0:
            raise ImageLoadError(f"{label}: empty file (0 bytes)")
        fp = p
    else:
        label = name or getattr(source, "name", "<file object>")
        fp = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                # Explicit check as well: warning filters are process-global, so under the cache's
                # decoding threads the filter above is not guaranteed to be in force.
                limit = Image.MAX_IMAGE_PIXELS
                if limit and img.width * img.height > limit:
                    raise Image.DecompressionBombError(
                        f"Image size ({img.width * img.height} pixels) exceeds limit of {limit} pixels"
                    )
                if draft_size and img.format == "JPEG" and not getattr(img, "is_animated", False):
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(
            f"{label}: image too large ({e}); raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"{label}: cannot decode image ({e})") from None


def image_to_uint8(img: Image.Image, image_size: int) -> torch.Tensor:
    """Resize an RGB image to ``image_size`` x ``image_size`` (antialiased bilinear).

    Returns:
        A uint8 tensor of shape (3, image_size, image_size).
    """
    img = img.resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode_uint8(source: ImageSource, image_size: int, name: str | None = None) -> torch.Tensor:
    """The one preprocessing path for training, the cache and inference: load, RGB, resize.

    Returns:
        A uint8 tensor of shape (3, image_size, image_size).
    """
    return image_to_uint8(load_image(source, name=name, draft_size=2 * image_size), image_size)


def normalize_batch(
    x: torch.Tensor,
    device: torch.device | str,
    mean: Sequence[float] = config.IMAGENET_MEAN,
    std: Sequence[float] = config.IMAGENET_STD,
    channels_last: bool = False,
) -> torch.Tensor:
    """Move a uint8 batch (B, 3, H, W) to ``device`` and normalise it to float32."""
    x = x.to(device, non_blocking=True).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, used for duplicate detection and as the cache key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- dataset folder


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


# --------------------------------------------------------------------------- splits


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
    from sklearn.model_selection import StratifiedGroupKFold

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**meta, "train": list(train_names), "val": list(val_names)}, indent=1))
    os.replace(tmp, path)
    return path


def load_split(path: str | os.PathLike) -> dict:
    """Read a split written by ``save_split``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found; run the training step (02_train) first")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- torch Dataset


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
