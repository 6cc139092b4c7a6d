"""The decode-once cache: same tensors as a fresh decode, keyed by content and size, no decoding after the first epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aimonk.data.images
from aimonk.cache import DecodedCache
from aimonk.data import ImageDataset, decode_uint8


def _write_jpeg(path: Path, seed: int, size=(48, 36)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


@pytest.fixture
def images(tmp_path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    return [_write_jpeg(folder / f"img_{i}.jpg", seed=i) for i in range(5)]


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts calls of ``aimonk.data.load_image`` (every decode goes through it) and of ``PIL.Image.open``."""
    calls = {"load_image": 0, "open": 0}
    real_load, real_open = aimonk.data.load_image, Image.open

    def load_image(*args, **kwargs):
        calls["load_image"] += 1
        return real_load(*args, **kwargs)

    def open_(*args, **kwargs):
        calls["open"] += 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(aimonk.data.images, "load_image", load_image)
    monkeypatch.setattr(Image, "open", open_)
    return calls


def test_cached_dataset_gives_the_same_tensors_as_a_fresh_decode(images, tmp_path):
    cache = DecodedCache(images, 32, tmp_path / "cache", progress=False)
    ds = ImageDataset(cache, np.zeros((len(images), 4)))
    for i, path in enumerate(images):
        x, _ = ds[i]
        fresh = decode_uint8(path, 32)
        assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
        assert torch.equal(x, fresh)


def test_changed_image_bytes_make_a_new_entry_with_the_new_content(images, tmp_path):
    root = tmp_path / "cache"
    before = DecodedCache(images, 32, root, progress=False)
    old_file, old_pixels = before.files[2], before[2].copy()
    _write_jpeg(images[2], seed=99)  # same name, different bytes
    after = DecodedCache(images, 32, root, progress=False)
    assert after.n_decoded == 1  # only the changed image is decoded again
    assert after.files[2] != old_file and after.digests[2] != before.digests[2]
    assert np.array_equal(after[2], decode_uint8(images[2], 32).numpy())
    assert not np.array_equal(after[2], old_pixels)
    assert [after.files[i] for i in (0, 1, 3, 4)] == [before.files[i] for i in (0, 1, 3, 4)]


def test_another_image_size_uses_another_entry(images, tmp_path):
    small = DecodedCache(images, 32, tmp_path / "cache", progress=False)
    large = DecodedCache(images, 48, tmp_path / "cache", progress=False)
    assert large.n_decoded == len(images)  # nothing reused across sizes
    assert all(a != b for a, b in zip(small.files, large.files))
    assert small[0].shape == (3, 32, 32) and large[0].shape == (3, 48, 48)


def test_epochs_after_the_first_do_no_decoding(images, tmp_path, count_decodes):
    cache = DecodedCache(images, 32, tmp_path / "cache", workers=1, progress=False)
    assert count_decodes["load_image"] == len(images)  # the first epoch decodes each image once
    count_decodes.update(load_image=0, open=0)
    ds = ImageDataset(cache, np.zeros((len(images), 4)), transform=lambda x: torch.flip(x, dims=[2]))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True)
    for _ in range(2):
        seen = sum(len(x) for x, _ in loader)
        assert seen == len(images)
    again = DecodedCache(images, 32, tmp_path / "cache", progress=False)  # a later run finds everything cached
    assert again.n_decoded == 0
    assert count_decodes == {"load_image": 0, "open": 0}


def test_unreadable_image_is_recorded_in_failed(images, tmp_path):
    broken = images[0].parent / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    paths = images + [broken]
    with pytest.warns(UserWarning, match="1 unreadable image"):
        cache = DecodedCache(paths, 32, tmp_path / "cache", progress=False)
    assert list(cache.failed) == [len(images)]
    assert "broken.jpg" in cache.failed[len(images)]
    assert cache.ok == list(range(len(images)))
    assert not cache.files[len(images)].exists()


def test_entries_are_written_whole(images, tmp_path):
    cache = DecodedCache(images, 32, tmp_path / "cache", progress=False)
    assert all(f.is_file() for f in cache.files)
    assert not list((tmp_path / "cache").rglob("*.tmp.npy"))  # temporary files were renamed into place
