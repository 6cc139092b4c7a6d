"""Image loading: every PIL mode opens as RGB, transparency on white, 16-bit rescaled, EXIF applied."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from aimonk.data import ImageDataset, ImageLoadError, decode_uint8, image_to_uint8, load_image, normalize_batch

W, H = 24, 16  # deliberately not square


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgba_image() -> Image.Image:
    """Left half: opaque pure red; right half: fully transparent black."""
    arr = np.zeros((H, W, 4), np.uint8)
    arr[:, : W // 2] = (255, 0, 0, 255)
    return Image.fromarray(arr, "RGBA")


def la_image() -> Image.Image:
    """Left half: opaque black; right half: fully transparent black."""
    arr = np.zeros((H, W, 2), np.uint8)
    arr[:, : W // 2, 1] = 255
    return Image.fromarray(arr, "LA")


def palette_with_transparency() -> Image.Image:
    """Palette 0 = green (opaque), palette 1 = black marked transparent; left half 0, right half 1."""
    img = Image.new("P", (W, H), 0)
    img.putpalette([0, 200, 0, 0, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (W // 2, 0, W, H))
    img.info["transparency"] = 1
    return img


def check_halves(rgb: np.ndarray, left, right):
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[:, : W // 2], np.broadcast_to(left, (H, W // 2, 3)))
    np.testing.assert_array_equal(rgb[:, W // 2:], np.broadcast_to(right, (H, W - W // 2, 3)))


@pytest.mark.parametrize(
    ("make", "fmt", "left"),
    [
        (rgba_image, "PNG", (255, 0, 0)),
        (la_image, "PNG", (0, 0, 0)),
        (palette_with_transparency, "PNG", (0, 200, 0)),
        (palette_with_transparency, "GIF", (0, 200, 0)),
    ],
    ids=["RGBA", "LA", "P-png", "P-gif"],
)
@pytest.mark.parametrize("as_file", [False, True], ids=["pil", "file"])
def test_transparency_is_composited_on_white(tmp_path, make, fmt, left, as_file):
    img = make()
    if as_file:
        path = tmp_path / f"x.{fmt.lower()}"
        path.write_bytes(encode(img, fmt))
        out = load_image(path)
    else:
        out = load_image(img)
    assert out.mode == "RGB"
    check_halves(np.asarray(out), left, (255, 255, 255))  # fully transparent -> white, not black


def test_half_transparent_pixels_blend_with_white():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[..., 3] = 128  # black at ~50 % alpha
    out = np.asarray(load_image(Image.fromarray(arr, "RGBA")))
    assert np.all(np.abs(out.astype(int) - 127) <= 1)


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (Image.new("L", (W, H), 77), (77, 77, 77)),
        (Image.new("1", (W, H), 1), (255, 255, 255)),
        (Image.new("P", (W, H), 0).convert("RGB").convert("P"), (0, 0, 0)),
        (Image.new("CMYK", (W, H), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("CMYK", (W, H), (0, 0, 0, 255)), (0, 0, 0)),
        (Image.new("RGB", (W, H), (10, 20, 30)), (10, 20, 30)),
    ],
    ids=["L", "1", "P", "CMYK-red", "CMYK-black", "RGB"],
)
def test_opaque_modes_convert_to_rgb(img, expected):
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (W, H)
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(expected, (H, W, 3)))


def test_cmyk_jpeg_file_opens_as_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(encode(Image.new("CMYK", (4 * W, 4 * H), (0, 255, 255, 0)), "JPEG", quality=95))
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (4 * H, 4 * W, 3)
    assert out[..., 0].mean() > 230 and out[..., 1].mean() < 30 and out[..., 2].mean() < 30  # red
    small = decode_uint8(path, 8).float()  # through the reduced-size JPEG decoding as well
    assert small.shape == (3, 8, 8)
    assert small[0].mean() > 230 and small[1].mean() < 30 and small[2].mean() < 30


@pytest.mark.parametrize("as_file", [False, True], ids=["pil", "png-file"])
def test_16_bit_greyscale_is_rescaled_not_clipped(tmp_path, as_file):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)  # 8-bit clipping would give 0, 255, 255, 255
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    if as_file:
        path = tmp_path / "deep.png"
        path.write_bytes(encode(img, "PNG"))
        assert Image.open(path).mode.startswith("I")
        img = path
    out = np.asarray(load_image(img))
    assert out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_32_bit_integer_and_float_images_convert():
    i32 = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), "I")
    np.testing.assert_array_equal(np.asarray(load_image(i32))[0, :, 0], [0, 4, 255])
    f32 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(np.asarray(load_image(f32))[0, :, 0], [0, 127, 255])


def exif_jpeg(orientation: int, scale: int = 1) -> bytes:
    """A (40x20)*scale JPEG whose left half is red, with the given EXIF Orientation tag."""
    arr = np.zeros((20 * scale, 40 * scale, 3), np.uint8)
    arr[:, : 20 * scale] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(("orientation", "size"), [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_is_applied(orientation, size):
    out = load_image(exif_jpeg(orientation))
    assert out.size == size
    arr = np.asarray(out).astype(int)
    red = (arr[..., 0] > 200) & (arr[..., 1] < 60)
    if orientation == 6:  # rotate 90 degrees clockwise: the left half ends up on top
        assert red[:18].all() and not red[22:].any()
    if orientation == 8:  # 90 counter-clockwise: the left half ends up at the bottom
        assert red[22:].all() and not red[:18].any()
    if orientation == 3:  # 180: left half ends up on the right
        assert red[:, 22:].all() and not red[:, :18].any()


def test_exif_orientation_also_applies_to_pil_images_and_files(tmp_path):
    data = exif_jpeg(6)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    assert load_image(path).size == (20, 40)
    assert load_image(Image.open(io.BytesIO(data))).size == (20, 40)


def test_exif_orientation_survives_reduced_jpeg_decoding(tmp_path):
    path = tmp_path / "big_rotated.jpg"
    path.write_bytes(exif_jpeg(6, scale=4))  # 160x80, decoded at 1/4 scale by the draft mode
    x = decode_uint8(path, 8).int()  # (3, 8, 8)
    red = (x[0] > 200) & (x[1] < 60)
    assert red[:3].all() and not red[5:].any()  # the red left half is on top after rotation


SOURCES = {
    "RGB": lambda: Image.new("RGB", (W, H), (1, 2, 3)),
    "RGBA": rgba_image,
    "LA": la_image,
    "L": lambda: Image.new("L", (W, H), 9),
    "P": palette_with_transparency,
    "CMYK": lambda: Image.new("CMYK", (W, H), (0, 0, 0, 0)),
    "I;16": lambda: Image.fromarray(np.full((H, W), 1000, np.uint16)),
}


@pytest.mark.parametrize("make", SOURCES.values(), ids=SOURCES.keys())
@pytest.mark.parametrize("size", [8, 32])
def test_decode_uint8_gives_rgb_uint8_square(make, size):
    x = decode_uint8(make(), size)
    assert x.dtype == torch.uint8
    assert x.shape == (3, size, size)
    assert x.is_contiguous()


@pytest.mark.parametrize("kind", ["path", "str", "bytes", "bytearray", "memoryview", "file object", "pil"])
def test_every_source_kind_decodes_to_the_same_tensor(tmp_path, kind):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    data = encode(img, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    source = {
        "path": path, "str": str(path), "bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data),
        "file object": io.BytesIO(data), "pil": img,
    }[kind]
    torch.testing.assert_close(decode_uint8(source, 16), image_to_uint8(img, 16), rtol=0, atol=0)


def test_jpeg_draft_decoding_stays_close_to_full_decoding(tmp_path):
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((64, 64, 1))).astype(np.uint8)  # 512 px blocks
    path = tmp_path / "big.jpg"
    path.write_bytes(encode(Image.fromarray(smooth), "JPEG", quality=95))
    fast = decode_uint8(path, 32).int()
    full = image_to_uint8(load_image(path), 32).int()
    assert (fast - full).abs().float().mean() < 6


@pytest.mark.parametrize(
    ("content", "pattern"),
    [(b"", "empty file"), (b"this is not an image", "not a recognised image"), (None, "no such image file")],
    ids=["empty", "garbage", "missing"],
)
def test_unreadable_files_raise_an_error_naming_them(tmp_path, content, pattern):
    path = tmp_path / "bad_image.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=pattern) as info:
        load_image(path)
    assert "bad_image.jpg" in str(info.value)


def test_truncated_jpeg_raises_an_image_error(tmp_path):
    data = exif_jpeg(1)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(path)


def test_bytes_errors_use_the_given_name():
    with pytest.raises(ImageLoadError, match="^upload.png: not a recognised image"):
        load_image(b"garbage", name="upload.png")
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image(b"")


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(encode(Image.new("RGB", (40, 40)), "PNG"), name="bomb.png")


def test_normalize_batch_matches_the_formula():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 1, 2).contiguous()
    out = normalize_batch(x, "cpu", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 1, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-2.0, -1.0, -0.5]))
    torch.testing.assert_close(out[0, :, 0, 1], torch.tensor([2.0, 1.0, 0.5]))
    assert normalize_batch(x, "cpu", channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_image_dataset_returns_uint8_images_and_na_targets():
    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    ds = ImageDataset(images, np.array([[1, -1], [0, 1]]), transform=lambda x: torch.flip(x, dims=[2]))
    x, y = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 4, 4)
    torch.testing.assert_close(x, torch.flip(torch.from_numpy(images[0]), dims=[2]))
    torch.testing.assert_close(y, torch.tensor([1.0, -1.0]))
    assert len(ds) == 2


def test_the_decode_cache_skips_unreadable_images_with_a_warning_naming_them(tmp_path):
    from aimonk.cache import DecodedCache

    good = tmp_path / "good.png"
    Image.new("RGBA", (20, 10), (0, 0, 255, 255)).save(good)
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.warns(UserWarning, match=r"1 unreadable image\(s\) skipped: .*corrupt\.jpg"):
        cache = DecodedCache([good, bad], 8, tmp_path / "cache", progress=False)
    assert cache.ok == [0]
    assert "corrupt.jpg" in cache.failed[1]
    assert cache[0].dtype == np.uint8 and cache[0].shape == (3, 8, 8)
    np.testing.assert_array_equal(cache[0][:, 0, 0], [0, 0, 255])
    again = DecodedCache([good], 8, tmp_path / "cache", progress=False)
    assert again.n_decoded == 0  # decoded once, then read back
    np.testing.assert_array_equal(again[0], cache[0])
