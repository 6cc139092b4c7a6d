"""A corpus of bad inputs, generated here (no binary junk is committed), run through every layer.

Layers: the labels parser and dataset index, the decode-once cache, training, ``Predictor`` and
``predict``, the CLI and the upload panel's handler. Each case ends in a clear error that names
the file (and line) and what was expected, or in a documented fallback with a warning. The table in
docs/bad-inputs.md lists the same cases; every row is checked here or in test_reliability.py and
test_written_files.py.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image

from aimonk import config
from aimonk.cache import DecodedCache
from aimonk.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from aimonk.cli import main as cli_main
from aimonk.data import ImageLoadError, LabelFileError, decode_uint8, index_dataset, load_image, parse_labels
from aimonk.model import build_model
from aimonk.predict import Predictor, predict
from aimonk.train import TrainConfig, train

ATTRS = ["Attr1", "Attr2", "Attr3", "Attr4"]


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(color, size=(40, 40), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb, cheaply)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_dataset(root: Path, n: int = 8, labels: list[str] | None = None, seed: int = 0) -> Path:
    """``n`` small PNGs whose colours encode four attributes, and a labels.txt (or the given lines)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        y = rng.integers(0, 2, 4)
        arr = rng.integers(0, 40, (40, 40, 3)).astype(np.uint8)
        arr[..., 0] += np.uint8(200 * y[0])
        arr[..., 1] += np.uint8(200 * y[1])
        arr[:20, :, 2] += np.uint8(200 * y[2])
        arr[:, :20] //= np.uint8(1 + 2 * y[3])
        Image.fromarray(arr).save(root / "images" / f"img_{i}.png")
        lines.append(f"img_{i}.png " + " ".join(map(str, y)))
    (root / "labels.txt").write_text("\n".join(labels if labels is not None else lines) + "\n")
    return root


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with warnings.catch_warnings():  # the CLI changes the warning filters and format for the process
        rc = cli_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def tiny_train_config(data: Path, tmp_path: Path, **kw) -> TrainConfig:
    return tiny_config(data, tmp_path / "out" / "model.pth", tmp_path / "cache", **{"val_fraction": 0.0, **kw})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-init 4-attribute ResNet18 checkpoint at 32 px (cheap, no training)."""
    torch.manual_seed(0)
    model = build_model("resnet18", 4, weights="none").eval()
    meta = {"backbone": "resnet18", "attributes": ATTRS, "image_size": 32, "mean": list(config.IMAGENET_MEAN),
            "std": list(config.IMAGENET_STD), "thresholds": [0.5] * 4, "decision": ["threshold"] * 4}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth", model, meta)


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor(checkpoint, device="cpu", precision="fp32")


# =========================================================================== labels.txt

CLEAN = ["img_0.png 1 0 NA 1", "img_1.png 0 1 1 0", "img_2.png NA NA 0 1"]
CLEAN_TARGETS = [[1, 0, -1, 1], [0, 1, 1, 0], [-1, -1, 0, 1]]

# (file bytes, None for "parses exactly like the clean file" or a regex the error must match)
LABEL_CASES = [
    pytest.param("\n".join(CLEAN).encode(), None, id="clean"),
    pytest.param(("img_0.png 1 0 NA 1\nimg_1.png 0 1 1\nimg_2.png NA NA 0 1\n").encode(),
                 r"labels\.txt line 2: expected 4 labels after the file name, got 3", id="wrong-field-count"),
    pytest.param(("img_0.png 1 0 NA 1\nimg_1.png 0 2 1 0\n").encode(),
                 r"labels\.txt line 2: label 2 is '2'; expected 1, 0 or NA", id="unknown-token"),
    pytest.param(("img_0.png 1 0 NA 1\nimg_1.png 0 1 1 yes\n").encode(),
                 r"labels\.txt line 2: label 4 is 'yes'; expected 1, 0 or NA", id="unknown-token-word"),
    pytest.param(("img_0.png 1 0 NA 1\nimg_1.png 0 1 1 0\nimg_0.png 0 0 0 0\n").encode(),
                 r"labels\.txt line 3: duplicate image name 'img_0\.png' \(first seen on line 1\)", id="duplicate-name"),
    pytest.param(b"\xef\xbb\xbf" + "\n".join(CLEAN).encode(), None, id="utf8-bom"),
    pytest.param("\r\n".join(CLEAN).encode() + b"\r\n", None, id="crlf"),
    pytest.param("\n".join(line.replace(" ", "\t") for line in CLEAN).encode(), None, id="tabs"),
    pytest.param("\n".join(line + "  \t " for line in CLEAN).encode() + b"\n\n  \n", None, id="trailing-spaces"),
    pytest.param(b"", r"labels\.txt: no label rows found", id="empty-file"),
    pytest.param(b"\n \n", r"labels\.txt: no label rows found", id="blank-file"),
    pytest.param(("image Attr1 Attr2 Attr3 Attr4\n" + "\n".join(CLEAN)).encode(), None, id="header-line"),
    pytest.param(("my image.png 1 0 NA 1\n" + "\n".join(CLEAN)).encode(),
                 r"labels\.txt line 1: expected 4 labels after the file name, got 5 \(file names may not contain "
                 r"spaces\)", id="name-with-space"),
    pytest.param(("img_0.png 1 0 NA 1\nmy image.png 1 0 1\n").encode(),
                 r"labels\.txt line 2: label 1 is 'image\.png'; expected 1, 0 or NA \(file names may not contain "
                 r"spaces\)", id="name-with-space-same-count"),
    pytest.param(("img_0.png 1 0 NA 1\n/etc/passwd 1 0 1 1\n").encode(),
                 r"labels\.txt line 2: image name '/etc/passwd' is an absolute path", id="absolute-path"),
    pytest.param(("img_0.png 1 0 NA 1\nC:\\data\\x.png 1 0 1 1\n").encode(),
                 r"labels\.txt line 2: image name .* is an absolute path", id="absolute-windows-path"),
    pytest.param(("img_0.png 1 0 NA 1\n../secret.png 1 0 1 1\n").encode(),
                 r"labels\.txt line 2: image name '\.\./secret\.png' contains '\.\.'", id="dotdot"),
    pytest.param(("img_0.png 1 0 NA 1\nsub/../../secret.png 1 0 1 1\n").encode(),
                 r"labels\.txt line 2: image name .* contains '\.\.'", id="dotdot-nested"),
    pytest.param("\n".join(CLEAN).encode("utf-16"), r"labels\.txt: not UTF-8 text", id="utf16"),
]


def _write_labels(root: Path, data: bytes) -> Path:
    make_dataset(root, n=3, labels=[])
    (root / "labels.txt").write_bytes(data)
    (root / "secret.png").write_bytes(encode(solid((1, 2, 3)), "PNG"))  # outside images/
    return root / "labels.txt"


@pytest.mark.parametrize("data, error", LABEL_CASES)
def test_labels_parser_and_index(tmp_path, data, error):
    labels = _write_labels(tmp_path, data)
    if error is None:
        table = parse_labels(labels)
        assert table.names == ["img_0.png", "img_1.png", "img_2.png"]
        np.testing.assert_array_equal(table.targets, np.asarray(CLEAN_TARGETS, dtype=np.float32))
        assert table.attributes == ATTRS
        index = index_dataset(tmp_path)
        assert [p.name for p in index.paths] == table.names and not index.missing
        return
    with pytest.raises(LabelFileError, match=error):
        parse_labels(labels)
    with pytest.raises(LabelFileError, match=error):
        index_dataset(tmp_path)


@pytest.mark.parametrize("data, error", [c for c in LABEL_CASES if c.values[1] is not None])
def test_labels_errors_through_cli_train_fail_fast(tmp_path, capsys, monkeypatch, data, error):
    _write_labels(tmp_path / "data", data)
    monkeypatch.setattr(DecodedCache, "__init__", lambda *a, **k: pytest.fail("decoded images despite bad labels"))
    rc, _, err = run_cli(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m" / "model.pth"),
                          "--loss-plot", "", "--weights", "none", "--no-progress"], capsys)
    assert rc == 1
    assert_one_line_error(err, "labels.txt")


def test_header_names_the_attributes(tmp_path):
    labels = _write_labels(tmp_path, ("image red green top dark\n" + "\n".join(CLEAN)).encode())
    assert parse_labels(labels).attributes == ["red", "green", "top", "dark"]


def test_dotdot_never_reads_outside_images(tmp_path, monkeypatch):
    """``../`` is refused at parse time, before any file is opened; a symlink escaping images/ too."""
    _write_labels(tmp_path, b"img_0.png 1 0 NA 1\n../secret.png 1 0 1 1\n")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    with pytest.raises(LabelFileError, match="contains '..'"):
        index_dataset(tmp_path)
    assert opened == []

    (tmp_path / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "labels.txt").write_text("img_0.png 1 0 NA 1\nlink.png 1 0 1 1\n")
    with pytest.raises(LabelFileError, match=r"labels\.txt line 2: 'link\.png' points outside"):
        index_dataset(tmp_path)
    assert opened == []


# =========================================================================== images


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    full = encode(Image.fromarray(noise), "JPEG")
    return full[: len(full) * 2 // 3]


def _palette_png() -> bytes:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # index 0 blue but fully transparent, 1 red
    img.paste(1, (20, 0, 40, 40))
    return encode(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [solid(c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (64, 32), (20, 20, 20))
    img.paste((235, 235, 235), (32, 0, 64, 32))  # stored: dark left half, bright right half
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(img, "JPEG", exif=exif, quality=95)


def _check_color(expected, tol=6):
    def check(img: Image.Image, x: torch.Tensor) -> None:
        assert img.mode == "RGB"
        mean = x.float().mean(dim=(1, 2)).tolist()
        assert all(abs(m - e) <= tol for m, e in zip(mean, expected)), (mean, expected)
    return check


def _check_palette(img, x):
    assert x[:, 16, 2].tolist() == [255, 255, 255]  # transparent -> composited on white
    assert x[:, 16, 29].tolist() == [255, 0, 0]


def _check_exif(img, x):
    assert img.size == (32, 64)  # orientation applied: portrait
    top, bottom = x[:, :12].float().mean().item(), x[:, -12:].float().mean().item()
    assert top < 60 and bottom > 200, (top, bottom)  # the stored left half is now on top


def _check_one_pixel(img, x):
    assert img.size == (1, 1)
    assert (x == torch.tensor([9, 99, 199], dtype=torch.uint8).view(3, 1, 1)).all()


def _check_huge(img, x):
    assert img.size == (6000, 4000)
    _check_color((10, 120, 200), tol=8)(img, x)


# (file name, bytes factory, expected: a regex for the ImageLoadError, or a check of the decoded image,
#  PIL.Image.MAX_IMAGE_PIXELS to set, or None)
IMAGE_CASES = [
    pytest.param("truncated.jpg", _truncated_jpeg, r"truncated\.jpg: cannot decode image \(image file is truncated",
                 None, id="truncated-jpeg"),
    pytest.param("empty.jpg", lambda: b"", r"empty\.jpg: empty file \(0 bytes\)", None, id="zero-byte"),
    pytest.param("notes.jpg", lambda: b"these are my notes, not a photo\n" * 4,
                 r"notes\.jpg: not a recognised image file", None, id="text-named-jpg"),
    pytest.param("really_png.jpg", lambda: encode(solid((200, 30, 30)), "PNG"), _check_color((200, 30, 30)),
                 None, id="png-named-jpg"),
    pytest.param("cmyk.jpg", lambda: encode(solid((0, 200, 200, 0), mode="CMYK"), "JPEG", quality=95),
                 _check_color((255, 55, 55)), None, id="cmyk-jpeg"),
    pytest.param("deep.png", lambda: encode(Image.fromarray(np.full((40, 40), 40000, np.uint16)), "PNG"),
                 _check_color((156, 156, 156), tol=1), None, id="16bit-png"),
    pytest.param("palette.png", _palette_png, _check_palette, None, id="palette-png-transparency"),
    pytest.param("anim.gif", _animated_gif, _check_color((255, 0, 0), tol=2), None, id="animated-gif"),
    pytest.param("rotated.jpg", _exif_rotated_jpeg, _check_exif, None, id="exif-rotated-jpeg"),
    pytest.param("dot.png", lambda: encode(solid((9, 99, 199), size=(1, 1)), "PNG"), _check_one_pixel, None,
                 id="1x1-px"),
    pytest.param("bomb.png", lambda: png_claiming(100_000, 100_000),
                 r"bomb\.png: image too large .*exceeds limit.*MAX_IMAGE_PIXELS", None, id="decompression-bomb-header"),
    pytest.param("big.png", lambda: encode(solid((1, 2, 3), size=(64, 64)), "PNG"),
                 r"big\.png: image too large .*exceeds limit of 3000 pixels", 3000, id="over-pixel-limit"),
    pytest.param("huge.jpg", lambda: encode(solid((10, 120, 200), size=(6000, 4000)), "JPEG", quality=90),
                 _check_huge, None, id="huge-legit-6000x4000"),
]
BAD_IMAGE_IDS = [c.id for c in IMAGE_CASES if isinstance(c.values[2], str)]


@pytest.fixture
def image_case(request, tmp_path, monkeypatch):
    """Writes the case's file into ``tmp_path/images``; returns (path, expected)."""
    name, make, expected, max_pixels = request.param
    if max_pixels is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", max_pixels)
    path = tmp_path / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make())
    return path, expected


def _image_params():
    return [pytest.param(c.values, id=c.id) for c in IMAGE_CASES]


@pytest.mark.parametrize("image_case", _image_params(), indirect=True)
def test_image_load(image_case):
    path, expected = image_case
    for source in (path, path.read_bytes()):
        if isinstance(expected, str):
            with pytest.raises(ImageLoadError, match=expected):
                load_image(source, name=str(path) if isinstance(source, bytes) else None)
            with pytest.raises(ImageLoadError, match=expected):
                decode_uint8(source, 32, name=str(path))
        else:
            img = load_image(source)
            x = decode_uint8(source, 32)
            assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
            expected(img, x)


@pytest.mark.parametrize("image_case", _image_params(), indirect=True)
def test_image_in_decoded_cache(image_case, tmp_path):
    """Unreadable images are recorded and skipped with one warning naming them; others decode."""
    path, expected = image_case
    good = tmp_path / "images" / "good.png"
    good.write_bytes(encode(solid((50, 60, 70)), "PNG"))
    if isinstance(expected, str):
        with pytest.warns(UserWarning, match=r"1 unreadable image\(s\) skipped: .*" + expected):
            cache = DecodedCache([good, path], 32, tmp_path / "cache", progress=False)
        assert cache.ok == [0] and list(cache.failed) == [1]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cache = DecodedCache([good, path], 32, tmp_path / "cache", progress=False)
        assert cache.ok == [0, 1]
        expected(load_image(path), torch.from_numpy(cache[1]))


@pytest.mark.parametrize("image_case", _image_params(), indirect=True)
def test_image_predict(image_case, predictor):
    path, expected = image_case
    if isinstance(expected, str):
        with pytest.raises(ImageLoadError, match=expected):
            predictor.predict(path, name=str(path))
        with pytest.raises(ImageLoadError, match=expected):
            predict(str(path), model=predictor, show=False)
        [result] = predictor.predict_many([path])
        assert result.error and result.present == [] and result.probabilities == {}
        assert re.search(expected, result.error)
    else:
        result = predict(str(path), model=predictor, show=False)
        assert result.error is None and set(result.probabilities) == set(ATTRS)
        assert all(0 <= p <= 1 for p in result.probabilities.values())
        [batched] = predictor.predict_many([path])
        assert batched.probabilities == result.probabilities


@pytest.mark.parametrize("image_case", _image_params(), indirect=True)
def test_image_cli_predict(image_case, checkpoint, capsys):
    path, expected = image_case
    rc, out, err = run_cli(["predict", str(path), "--model", str(checkpoint), "--json"], capsys)
    assert "Traceback" not in err
    [row] = json.loads(out)
    if isinstance(expected, str):
        assert rc == 1 and re.search(expected, row["error"])
    else:
        assert rc == 0 and row["error"] is None and set(row["probabilities"]) == set(ATTRS)


@pytest.mark.parametrize("image_case", _image_params(), indirect=True)
def test_image_upload_panel(image_case, predictor):
    widgets = pytest.importorskip("aimonk.widgets")
    path, expected = image_case
    panel = widgets.UploadPanel(predictor)
    data = path.read_bytes()
    panel.handle_upload({"name": path.name, "size": len(data), "content": memoryview(data)})
    if isinstance(expected, str):
        assert panel.probs is None and panel.present == []
        assert path.name in panel.message.value
        reason = "is empty (0 bytes)" if not data else "Cannot read"
        assert reason in panel.message.value, panel.message.value
    else:
        assert panel.probs is not None and panel.probs.shape == (4,)
        assert panel.name == path.name and "Attributes present" in panel.result.value


def test_training_skips_unreadable_images(tmp_path, monkeypatch):
    """One dataset holding the whole image corpus: bad files are skipped with a warning naming each,
    odd-but-valid ones are trained on, and the checkpoint records what was skipped."""
    data = make_dataset(tmp_path / "data", n=8)
    rows = (tmp_path / "data" / "labels.txt").read_text().splitlines()
    bad, odd = [], []
    for case in IMAGE_CASES:
        name, make, expected, max_pixels = case.values
        if max_pixels is not None:
            continue  # a lowered pixel limit would also refuse the huge legitimate image
        (data / "images" / name).write_bytes(make())
        rows.append(f"{name} 1 0 NA 1")
        (bad if isinstance(expected, str) else odd).append(name)
    (data / "labels.txt").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning) as record:
        result = train(tiny_train_config(data, tmp_path))
    messages = " | ".join(str(w.message) for w in record)
    assert f"{len(bad)} unreadable image(s) skipped" in messages
    for name in bad:
        assert name in messages
    unreadable = " ".join(result.meta.data["unreadable"])
    assert all(name in unreadable for name in bad)
    split = json.loads((tmp_path / "out" / config.SPLIT_NAME).read_text())
    assert sorted(split["train"]) == sorted([f"img_{i}.png" for i in range(8)] + odd)
    assert all(np.isfinite(result.history["loss"]))


def test_evaluate_skips_unreadable_images(tmp_path, checkpoint):
    from aimonk.evaluate import score_folder

    data = make_dataset(tmp_path / "data", n=6)
    (data / "images" / "truncated.jpg").write_bytes(_truncated_jpeg())
    with (data / "labels.txt").open("a") as f:
        f.write("truncated.jpg 1 0 1 0\n")
    with pytest.warns(UserWarning, match=r"1 unreadable image\(s\) skipped: .*truncated\.jpg: cannot decode"):
        targets, probs, names, _ = score_folder(checkpoint, data, cache_dir=str(tmp_path / "cache"))
    assert names == [f"img_{i}.png" for i in range(6)] and probs.shape == targets.shape == (6, 4)


# =========================================================================== data-level


def test_attribute_without_positives_or_labels_falls_back_to_majority(tmp_path, predictor):
    """Attr3 is NA everywhere, Attr4 has no known positive: both warn, train, and are always absent."""
    make_dataset(tmp_path / "data", n=8)
    labels = tmp_path / "data" / "labels.txt"
    rows = [line.split() for line in labels.read_text().splitlines()]
    rows = [[n, a, b, "NA", "0" if i % 3 else "NA"] for i, (n, a, b, _, _) in enumerate(rows)]
    labels.write_text("\n".join(" ".join(r) for r in rows) + "\n")
    with pytest.warns(UserWarning) as record:
        result = train(tiny_train_config(tmp_path / "data", tmp_path))
    messages = [str(w.message) for w in record]
    assert any("Attr3: no known labels (all NA)" in m and "always reported absent" in m for m in messages)
    assert any("Attr4: no known positives" in m and "always reported absent" in m for m in messages)
    assert result.meta.decision == ["threshold", "threshold", "majority_absent", "majority_absent"]
    assert result.meta.pos_weight[2:] == [1.0, 1.0]
    assert all(np.isfinite(result.history["loss"]))
    p = Predictor(result.checkpoint, device="cpu", precision="fp32")
    for i in range(8):
        present = p.predict(tmp_path / "data" / "images" / f"img_{i}.png").present
        assert "Attr3" not in present and "Attr4" not in present


def test_every_row_missing_its_image(tmp_path, capsys):
    make_dataset(tmp_path / "data", n=3, labels=["gone_0.jpg 1 0 1 1", "gone_1.jpg 0 1 0 1"])
    with pytest.warns(UserWarning, match=r"2 labelled image\(s\) not found .*gone_0\.jpg, gone_1\.jpg"):
        with pytest.raises(LabelFileError, match=r"labels\.txt: none of the 2 labelled images exist in .*images"):
            index_dataset(tmp_path / "data")
    with pytest.warns(UserWarning, match="gone_0.jpg, gone_1.jpg"):
        rc, _, err = run_cli(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m" / "model.pth"),
                              "--loss-plot", "", "--weights", "none", "--no-progress"], capsys)
    assert rc == 1
    assert_one_line_error(err, "none of the 2 labelled images exist")


@pytest.mark.parametrize("n, batch_size", [(5, 16), (9, 4)], ids=["fewer-than-batch", "lone-last-image"])
def test_dataset_smaller_than_batch_trains(tmp_path, n, batch_size):
    """One partial batch per epoch; a lone last image (BatchNorm cannot train on one) is left out."""
    make_dataset(tmp_path / "data", n=n)
    result = train(tiny_train_config(tmp_path / "data", tmp_path, batch_size=batch_size, epochs=2))
    assert len(result.history["loss"]) == 2 * (n // batch_size if n % batch_size == 1 else -(-n // batch_size))
    assert all(np.isfinite(result.history["loss"]))
    assert load_checkpoint(result.checkpoint)[1].attributes == ATTRS


def test_too_few_images_for_a_validation_split(tmp_path, capsys):
    make_dataset(tmp_path / "data", n=3)
    rc, _, err = run_cli(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m" / "model.pth"),
                          "--loss-plot", "", "--weights", "none", "--no-progress", "--image-size", "32",
                          "--cache-dir", str(tmp_path / "cache")], capsys)
    assert rc == 1
    assert_one_line_error(err, "cannot make 5 folds from 3 distinct images", "val_fraction=0")


# =========================================================================== model files


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a pickle could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _state_bytes(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _model_case(kind: str, good: Path, marker: Path) -> bytes:
    payload = torch.load(good, weights_only=True)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    if kind == "three-attributes-meta-four":
        return _state_bytes({**meta, "state_dict": build_model("resnet18", 3, "none").state_dict()})
    if kind == "unknown-backbone":
        return _state_bytes({**payload, "backbone": "resnet50"})
    if kind == "other-backbone":
        return _state_bytes({**payload, "backbone": "efficientnet_lite0"})
    if kind == "truncated":
        return good.read_bytes()[: good.stat().st_size // 2]
    if kind == "empty":
        return b""
    if kind == "text":
        return b"this is not a model\n"
    if kind == "plain-state-dict":
        return _state_bytes(payload["state_dict"])
    if kind == "malicious-torch-save":
        return _state_bytes({**payload, "extra": _Payload(marker)})
    if kind == "malicious-bare-pickle":
        return pickle.dumps(_Payload(marker))
    raise ValueError(kind)


MODEL_CASES = [
    pytest.param("three-attributes-meta-four", r"weights do not fit backbone 'resnet18' with 4 attributes "
                 r"\(size mismatch for fc\.weight", id="attribute-count-mismatch"),
    pytest.param("unknown-backbone", r"unknown backbone 'resnet50'", id="unknown-backbone"),
    pytest.param("other-backbone", r"(weights do not fit backbone 'efficientnet_lite0'|optional extra)",
                 id="other-backbone"),
    pytest.param("truncated", r"truncated or corrupted", id="truncated"),
    pytest.param("empty", r"empty file \(0 bytes\)", id="empty"),
    pytest.param("text", r"unrecognised file format", id="not-a-checkpoint-text"),
    pytest.param("plain-state-dict", r"not an aimonk checkpoint", id="not-a-checkpoint-state-dict"),
    pytest.param("malicious-torch-save", r"arbitrary Python objects, refused for safety", id="malicious-torch-save"),
    pytest.param("malicious-bare-pickle", r"bare Python pickle, refused for safety", id="malicious-bare-pickle"),
]


@pytest.fixture
def model_case(request, tmp_path, checkpoint):
    kind, error = request.param
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pth"
    path.write_bytes(_model_case(kind, checkpoint, marker))
    yield path, error, marker
    assert not marker.exists(), "a model file ran code on load"


def _model_params():
    return [pytest.param(c.values, id=c.id) for c in MODEL_CASES]


def test_malicious_payloads_are_live(tmp_path, checkpoint):
    """Control: the payloads do run code under a plain unpickler, so the refusals below mean something."""
    marker = tmp_path / "control"
    pickle.loads(_model_case("malicious-bare-pickle", checkpoint, marker))
    assert marker.exists()
    marker.unlink()
    (tmp_path / "evil.pth").write_bytes(_model_case("malicious-torch-save", checkpoint, marker))
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("model_case", _model_params(), indirect=True)
def test_model_file_load(model_case):
    path, error, _ = model_case
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + error):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        Predictor(path)


@pytest.mark.parametrize("model_case", _model_params(), indirect=True)
def test_model_file_cli_and_predict(model_case, tmp_path, capsys):
    path, error, _ = model_case
    image = tmp_path / "x.png"
    image.write_bytes(encode(solid((1, 2, 3)), "PNG"))
    with pytest.raises(CheckpointError, match=error):
        predict(image, model=path, show=False)
    rc, out, err = run_cli(["predict", str(image), "--model", str(path)], capsys)
    assert rc == 1 and out == ""
    assert_one_line_error(err, str(path))
    assert re.search(error, err)


@pytest.mark.parametrize("model_case", _model_params(), indirect=True)
def test_model_file_upload_panel(model_case):
    widgets = pytest.importorskip("aimonk.widgets")
    path, error, _ = model_case
    panel = widgets.upload_panel(path)
    assert panel.predictor is None and panel.upload.disabled
    assert re.search(error, panel.message.value.replace("&#x27;", "'"))


UNREADABLE_MODEL_IDS = ["truncated", "empty", "not-a-checkpoint-text", "malicious-torch-save", "malicious-bare-pickle"]


@pytest.mark.parametrize("model_case", [p for p in _model_params() if p.id in UNREADABLE_MODEL_IDS], indirect=True)
def test_model_file_as_starting_weights(model_case):
    """``weights=<file>`` (fine-tuning) refuses unreadable and unsafe files with a CheckpointError naming them.

    (A plain state dict or another head size is a valid starting point: see the two tests below.)
    """
    path, error, _ = model_case
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + error):
        build_model("resnet18", 4, weights=str(path))


def test_checkpoint_with_other_attribute_count_is_self_describing(tmp_path, checkpoint, capsys):
    """A valid 3-attribute checkpoint predicts its own 3 attributes; a 4-attribute folder is refused
    by ``evaluate``; as starting weights its head is re-initialised with a warning."""
    torch.manual_seed(0)
    model = build_model("resnet18", 3, weights="none").eval()
    meta = {"backbone": "resnet18", "attributes": ["a", "b", "c"], "image_size": 32,
            "mean": list(config.IMAGENET_MEAN), "std": list(config.IMAGENET_STD), "thresholds": [0.5] * 3}
    three = save_checkpoint(tmp_path / "three.pth", model, meta)
    image = tmp_path / "x.png"
    image.write_bytes(encode(solid((1, 2, 3)), "PNG"))
    assert set(predict(image, model=three, show=False).probabilities) == {"a", "b", "c"}

    data = make_dataset(tmp_path / "data", n=4)
    rc, _, err = run_cli(["evaluate", "--model", str(three), "--data", str(data)], capsys)
    assert rc == 1
    assert_one_line_error(err, "4 attributes", "predicts 3")

    with pytest.warns(UserWarning, match=r"three\.pth: its classification head has another number of outputs"):
        four = build_model("resnet18", 4, weights=str(three))
    assert torch.equal(four.conv1.weight, model.conv1.weight)


def test_weights_from_another_backbone_are_refused(tmp_path):
    other = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_fc.weight": torch.zeros(4, 1280)}
    path = tmp_path / "effnet_like.pth"
    torch.save(other, path)
    with pytest.raises(CheckpointError, match=r"effnet_like\.pth: weights do not fit backbone 'resnet18'"):
        build_model("resnet18", 4, weights=str(path))

