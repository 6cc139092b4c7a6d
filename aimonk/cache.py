"""Decode-once image cache: each image is decoded and resized once, then read back as uint8.

Entries are ``.npy`` files named by the sha256 of the image file's bytes, the image size and
the preprocessing version, so a changed file or a new size simply misses the cache. Nothing is
held in RAM beyond the item being read: memory is O(1) in the dataset size, disk is
3 * S * S bytes per image (147 KiB at 224 px).
"""

from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from aimonk import config
from aimonk.data import ImageLoadError, decode_uint8, file_digest
from aimonk.files import atomic_write_bytes
from aimonk.progress import tqdm

PREPROCESS_VERSION = 1  # bump when decode_uint8 changes


class DecodedCache:
    """Indexable view of decoded images, building missing entries on construction.

    Args:
        paths: image files.
        image_size: side of the square uint8 images.
        cache_dir: where entries live (default ``config.CACHE_DIR``).
        digests: precomputed sha256 per path (computed if omitted).
        workers: decoding threads; PIL releases the GIL while decoding.
        progress: show a progress bar while decoding.

    After construction, ``failed`` maps the index of each unreadable image to the reason;
    those indices must not be read.
    """

    def __init__(
        self,
        paths: Sequence[os.PathLike | str],
        image_size: int,
        cache_dir: os.PathLike | str | None = None,
        digests: Sequence[str] | None = None,
        workers: int | None = None,
        progress: bool = True,
    ):
        self.paths = [Path(p) for p in paths]
        self.image_size = int(image_size)
        self.root = Path(cache_dir) if cache_dir is not None else config.CACHE_DIR
        self.root = self.root / f"s{self.image_size}_v{PREPROCESS_VERSION}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.digests = list(digests) if digests is not None else [file_digest(p) for p in self.paths]
        self.files = [self.root / d[:2] / f"{d}.npy" for d in self.digests]
        self.failed: dict[int, str] = {}
        todo = [i for i, f in enumerate(self.files) if not f.is_file()]
        self.n_decoded = len(todo)
        if todo:
            workers = workers or min(4, os.cpu_count() or 1)
            with ThreadPoolExecutor(workers) as pool:
                results = pool.map(self._build, todo)
                for i, err in tqdm(zip(todo, results), total=len(todo), desc="decoding images", disable=not progress):
                    if err is not None:
                        self.failed[i] = err
        if self.failed:
            listed = "; ".join(self.failed[i] for i in sorted(self.failed)[:10])
            warnings.warn(f"{len(self.failed)} unreadable image(s) skipped: {listed}", stacklevel=2)

    def _build(self, i: int) -> str | None:
        try:
            arr = decode_uint8(self.paths[i], self.image_size).numpy()
        except ImageLoadError as e:
            return str(e)
        buffer = io.BytesIO()
        np.save(buffer, arr)
        atomic_write_bytes(self.files[i], buffer.getbuffer())  # a reader never sees half an entry
        return None

    @property
    def ok(self) -> list[int]:
        """Indices of images that decoded."""
        return [i for i in range(len(self.paths)) if i not in self.failed]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        """The decoded image ``i``, uint8 of shape (3, S, S).

        Every entry read back is checked; a damaged one (truncated, empty, not an array, another shape
        or dtype) is decoded again from the image, with a one-line warning, and never used.
        """
        try:
            return self._read(i)
        except (OSError, ValueError, EOFError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        warnings.warn(f"{self.files[i]}: damaged cache entry of {self.paths[i]} ({reason}); decoded it again "
                      "from the image", stacklevel=2)
        error = self._build(i)
        if error is not None:
            raise ImageLoadError(error)
        return self._read(i)

    def _read(self, i: int) -> np.ndarray:
        arr = np.load(self.files[i], allow_pickle=False)
        expected = (3, self.image_size, self.image_size)
        if arr.dtype != np.uint8 or arr.shape != expected:
            raise ValueError(f"it holds a {arr.dtype} array of shape {arr.shape}, not uint8 {expected}")
        return arr
