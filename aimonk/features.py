"""Frozen pretrained features, computed once per image and cached on disk.

A frozen network's features of an image depend only on the image bytes, the network and the input
size, so they are cached under that key: ``CACHE_DIR/features/<backbone>_<weights>_s<size>_v<version>/``
(``..._hflip_v<version>/`` for the mirrored images) holds one float32 ``.npy`` per image, named by the
sha256 of the image file. The label audit reads them (``frozen_features``), and so does the probe of
the ``pretrained`` recipe at the end of training (``cached_features``): a second audit, or a retraining
after a label change, computes only the images it has not seen.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from aimonk import config
from aimonk.cache import DecodedCache
from aimonk.data import ImageDataset, file_digest, normalize_batch
from aimonk.files import atomic_write_bytes
from aimonk.model import BACKBONES, EFFICIENTNET_LITE_SHA256, feature_probe
from aimonk.progress import tqdm

FEATURE_VERSION = 1  # bump when the preprocessing or the feature definition changes
DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1")  # the pretrained recipe's probe reads these


def feature_dir(backbone: str, image_size: int, cache_dir: str | os.PathLike | None = None,
                flip: bool = False) -> Path:
    """The cache folder of one frozen network at one input size, of the images as they are or mirrored
    (``flip``); the weights' hash is part of its name."""
    weights = EFFICIENTNET_LITE_SHA256.get(backbone, "imagenet1k_v1")[:8]
    root = Path(cache_dir) if cache_dir else config.CACHE_DIR
    view = "_hflip" if flip else ""
    return root / "features" / f"{backbone}_{weights}_s{int(image_size)}{view}_v{FEATURE_VERSION}"


def frozen_features(paths: Sequence[str | os.PathLike], backbones: Sequence[str] = DEFAULT_BACKBONES,
                    image_size: int = 224, digests: Sequence[str] | None = None,
                    cache_dir: str | os.PathLike | None = None, batch_size: int = 32,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated features of ``backbones`` (ImageNet weights, eval mode, no augmentation) per image.

    Args:
        paths: image files.
        backbones: frozen networks (names in ``model.BACKBONES``) sharing one input normalisation.
        image_size: images are resized to this square size, as for training.
        digests: sha256 per path (computed if omitted).
        cache_dir: cache root (default ``config.CACHE_DIR``).
        batch_size: images per forward pass.
        progress: show a progress bar for the images not cached yet.
    Returns:
        ``(features, ok)``: float32 (n_ok, D) for the readable images, and their indices into ``paths``.
    Raises:
        WeightsUnavailableError: if a network's pretrained weights cannot be had.
    """
    digests = list(digests) if digests is not None else [file_digest(p) for p in paths]
    images = DecodedCache(paths, image_size, cache_dir, digests=digests, progress=progress)
    ok = np.asarray(images.ok, dtype=int)
    trunks = [None] * len(backbones)  # built only if some image is not cached yet
    return cached_features(backbones, trunks, images, ok, cache_dir=cache_dir, batch_size=batch_size,
                           progress=progress), ok


def cached_features(backbones: Sequence[str], trunks: Sequence[nn.Module | None], images: DecodedCache,
                    rows: Sequence[int], *, flip: bool = False, cache_dir: str | os.PathLike | None = None,
                    device: torch.device | str = "cpu", channels_last: bool = False, batch_size: int = 32,
                    progress: bool = False) -> np.ndarray:
    """The concatenated fp32 features of ``backbones`` for the rows ``rows`` of ``images`` (mirrored with
    ``flip``): read from the cache, the rest computed by ``trunks`` (None: built with ImageNet weights),
    in eval mode, and stored.

    Returns:
        float32 (len(rows), sum of the backbones' feature_dim).
    """
    rows = np.asarray(rows, dtype=int)
    parts = [_cached_features(b, t, images, rows, flip, cache_dir, device, channels_last, batch_size, progress)
             for b, t in zip(backbones, trunks)]
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(rows), 0), np.float32)


def _cached_features(backbone: str, trunk: nn.Module | None, images: DecodedCache, rows: np.ndarray, flip: bool,
                     cache_dir, device, channels_last: bool, batch_size: int, progress: bool) -> np.ndarray:
    """One network's features for the rows ``rows`` of ``images``: read from the cache, the rest computed and stored."""
    folder = feature_dir(backbone, images.image_size, cache_dir, flip)
    files = [folder / images.digests[i][:2] / f"{images.digests[i]}.npy" for i in rows]
    feats = np.zeros((len(rows), BACKBONES[backbone].feature_dim), np.float32)
    todo = []
    for k, f in enumerate(files):
        try:
            feats[k] = np.load(f)
        except (OSError, ValueError):  # absent, or damaged (then recomputed and replaced)
            todo.append(k)
    if todo:
        trunk = trunk if trunk is not None else feature_probe([backbone], 1).trunks[0]
        mirror = v2.RandomHorizontalFlip(p=1.0) if flip else None
        dataset = ImageDataset(torch.utils.data.Subset(images, rows[todo].tolist()), np.zeros((len(todo), 1)), mirror)
        computed = _forward(trunk.eval(), dataset, BACKBONES[backbone], batch_size, device, channels_last,
                            tqdm(total=len(todo), desc=f"features {backbone}", disable=not progress))
        for k, row in zip(todo, computed):
            feats[k] = row
            atomic_write_bytes(files[k], _npy_bytes(row))
    return feats


@torch.inference_mode()
def _forward(trunk: nn.Module, dataset: ImageDataset, spec, batch_size: int, device, channels_last: bool,
             bar) -> np.ndarray:
    """The trunk's outputs (N, D) on ``dataset``, in fp32, on the CPU."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out = []
    with bar:
        for x, _ in loader:
            out.append(trunk(normalize_batch(x, device, spec.mean, spec.std, channels_last)).float().cpu())  # (B, D)
            bar.update(len(x))
    return torch.cat(out).numpy()


def _npy_bytes(row: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, row.astype(np.float32))
    return buf.getvalue()
