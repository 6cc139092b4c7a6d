"""Unreadable inputs to ``predict`` and hostile bytes in labels.txt, each made for real: FIFOs, broken and
looping symbolic links, device files, files that vanish, ``chmod 000`` (skipped as root, which ignores
permissions), NUL bytes and ANSI escapes written into labels.txt and into file names."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from PIL import Image

from aimonk.cli import main as cli_main
from aimonk.data import ImageLoadError, LabelFileError, index_dataset, load_image, parse_labels
from aimonk.explore import dataset_health
from aimonk.predict import Predictor, list_images

PROBS = [0.9, 0.2, 0.4, 0.7]
AS_ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
needs_permissions = pytest.mark.skipif(AS_ROOT, reason="root ignores file permissions, so chmod 000 is no fault")
pytestmark = pytest.mark.timeout(120)  # a FIFO that is opened blocking would hang the test for ever


@pytest.fixture(scope="module")
def model(make_constant_checkpoint, tmp_path_factory) -> Path:
    return make_constant_checkpoint(PROBS, tmp_path_factory.mktemp("reliability") / "model.pth")


@pytest.fixture(scope="module")
def predictor(model) -> Predictor:
    return Predictor(model, device="cpu")


@pytest.fixture
def unlock(tmp_path):
    """Give permissions back after a ``chmod 000`` test, so that pytest can remove the folder."""
    locked: list[Path] = []
    yield locked.append
    for p in locked:
        os.chmod(p, 0o755)


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    with warnings.catch_warnings():  # the CLI changes the warning filters and format for the process
        rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def good_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), (200, 30, 30)).save(path)
    return path


# --------------------------------------------------------------------------- class 5: unreadable inputs to predict
# Each maker creates one bad path under ``tmp`` for real and returns it with the reason the user must see.


def _fifo(tmp: Path, unlock) -> tuple[Path, str]:
    os.mkfifo(tmp / "pipe.jpg")
    return tmp / "pipe.jpg", "a FIFO (named pipe), not a regular file"


def _broken_link(tmp: Path, unlock) -> tuple[Path, str]:
    (tmp / "link.jpg").symlink_to(tmp / "gone.jpg")
    return tmp / "link.jpg", "broken symbolic link"


def _link_loop(tmp: Path, unlock) -> tuple[Path, str]:
    (tmp / "loop.jpg").symlink_to(tmp / "loop.jpg")
    return tmp / "loop.jpg", "symbolic link loop (ELOOP)"


def _missing(tmp: Path, unlock) -> tuple[Path, str]:
    return tmp / "never.jpg", "no such image file"


def _device(tmp: Path, unlock) -> tuple[Path, str]:
    return Path("/dev/zero"), "a character device, not a regular file"  # read blocking, it never ends


def _locked_file(tmp: Path, unlock) -> tuple[Path, str]:
    path = good_image(tmp / "locked.jpg")
    os.chmod(path, 0)
    unlock(path)
    return path, "permission denied (EACCES)"


def _locked_folder(tmp: Path, unlock) -> tuple[Path, str]:
    folder = tmp / "locked"
    good_image(folder / "inside.jpg")
    os.chmod(folder, 0)
    unlock(folder)
    return folder, "permission denied (EACCES)"


BAD_PATHS = [
    pytest.param(_fifo, id="fifo"),
    pytest.param(_broken_link, id="broken-symlink"),
    pytest.param(_link_loop, id="symlink-loop"),
    pytest.param(_missing, id="missing"),
    pytest.param(_device, id="device", marks=pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")),
    pytest.param(_locked_file, id="chmod-000-file", marks=needs_permissions),
    pytest.param(_locked_folder, id="chmod-000-folder", marks=needs_permissions),
]


@pytest.mark.parametrize("make_bad", BAD_PATHS)
def test_predict_many_gives_an_error_entry_for_a_bad_path(predictor, tmp_path, unlock, make_bad):
    bad, reason = make_bad(tmp_path, unlock)
    good = good_image(tmp_path / "good.jpg")
    first, second, third = predictor.predict_many([good, bad, good])
    assert second.image == bad.name and second.present == [] and second.probabilities == {}
    assert second.error == f"{bad}: {reason}" or (second.error.startswith(f"{bad}: ") and reason in second.error)
    assert first.error is None and third.error is None and first.present == ["Attr1", "Attr4"]


@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("make_bad", BAD_PATHS)
def test_cli_predict_reports_each_bad_path_and_predicts_the_rest(model, tmp_path, unlock, capsys, make_bad, json_out):
    bad, reason = make_bad(tmp_path, unlock)
    good = good_image(tmp_path / "good.jpg")
    rc, out, err = run_cli(["predict", "--model", model, good, bad, *(["--json"] if json_out else [])], capsys)
    assert rc == 1  # some images could not be predicted
    assert "Traceback" not in err and "error:" not in err
    if json_out:
        entries = json.loads(out)
        assert len(entries) == 2  # one entry per path
        assert entries[0]["image"] == "good.jpg" and entries[0]["error"] is None
        assert entries[1]["image"] == bad.name and entries[1]["error"].startswith(f"{bad}: ")
        assert reason in entries[1]["error"] and "\n" not in entries[1]["error"]
    else:
        assert out.startswith("Image: good.jpg\nAttributes present: ['Attr1', 'Attr4']\n")
        lines = out.splitlines()[2:]
        assert lines[0] == f"Image: {bad.name}" and lines[1].startswith(f"Error: {bad}: ") and reason in lines[1]
        assert len(lines) == 2


def test_cli_predict_of_only_bad_paths_still_prints_json(model, tmp_path, unlock, capsys):
    bad = [_fifo(tmp_path, unlock)[0], _broken_link(tmp_path, unlock)[0], _missing(tmp_path, unlock)[0]]
    rc, out, err = run_cli(["predict", "--model", model, "--json", *bad], capsys)
    assert rc == 1 and err == ""
    entries = json.loads(out)
    assert [e["image"] for e in entries] == [p.name for p in bad] and all(e["error"] for e in entries)


def test_a_folder_with_a_fifo_a_broken_link_and_a_link_loop_is_walked_without_hanging(predictor, tmp_path):
    folder = tmp_path / "photos"
    good = [good_image(folder / "a.jpg"), good_image(folder / "sub" / "b.png")]
    os.mkfifo(folder / "pipe.jpg")
    (folder / "broken.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "sub" / "up").symlink_to(folder)  # a folder loop: photos/sub/up/sub/up/...
    (folder / "notes.txt").write_text("not an image extension")
    paths = list_images([folder])
    assert paths == sorted([*good, folder / "pipe.jpg", folder / "broken.jpg"])  # each once, the loop not followed
    results = {r.image: r for r in predictor.predict_many(paths)}
    assert results["a.jpg"].error is None and results["b.png"].error is None
    assert "broken symbolic link" in results["broken.jpg"].error and "FIFO" in results["pipe.jpg"].error


@needs_permissions
def test_a_subfolder_that_cannot_be_listed_is_one_error_entry(model, tmp_path, unlock, capsys):
    folder = tmp_path / "photos"
    good_image(folder / "a.jpg")
    good_image(folder / "locked" / "hidden.jpg")
    os.chmod(folder / "locked", 0)
    unlock(folder / "locked")
    rc, out, err = run_cli(["predict", "--model", model, "--json", folder], capsys)
    assert rc == 1 and err == ""
    entries = {e["image"]: e for e in json.loads(out)}
    assert set(entries) == {"a.jpg", "locked"}
    assert entries["a.jpg"]["error"] is None
    assert entries["locked"]["error"] == f"{folder / 'locked'}: cannot read it: permission denied (EACCES)"


def test_a_file_that_vanishes_between_listing_and_reading(predictor, tmp_path):
    folder = tmp_path / "photos"
    paths = list_images([good_image(folder / "a.jpg").parent, good_image(tmp_path / "b.jpg")])
    (folder / "a.jpg").unlink()
    gone, kept = predictor.predict_many(paths)
    assert gone.error == f"{folder / 'a.jpg'}: no such image file" and kept.error is None


def test_a_file_replaced_by_a_fifo_after_listing_is_refused_without_blocking(predictor, tmp_path):
    path = good_image(tmp_path / "a.jpg")
    paths = list_images([tmp_path])
    path.unlink()
    os.mkfifo(path)
    [result] = predictor.predict_many(paths)
    assert "FIFO" in result.error


def test_hostile_file_names_are_escaped_in_text_and_valid_in_json(model, tmp_path, capsys):
    folder = tmp_path / "photos"
    good_image(folder / "\x1b[31mred.jpg")
    (folder / "\x1b]0;owned\x07.jpg").write_bytes(b"not an image")
    os.close(os.open(os.path.join(os.fsencode(folder), b"latin\xe9.jpg"), os.O_CREAT | os.O_WRONLY))  # not UTF-8
    rc, out, _ = run_cli(["predict", "--model", model, folder], capsys)
    assert rc == 1
    assert "\x1b" not in out and "\x07" not in out and "\udce9" not in out
    assert "Image: '\\x1b[31mred.jpg'\nAttributes present: ['Attr1', 'Attr4']" in out
    assert "Image: '\\x1b]0;owned\\x07.jpg'\nError: " in out and "Image: 'latin\\udce9.jpg'\nError: " in out
    rc, out, _ = run_cli(["predict", "--model", model, "--json", folder], capsys)
    assert rc == 1 and "\x1b" not in out
    names = sorted(e["image"] for e in json.loads(out))
    assert names == sorted(["\x1b[31mred.jpg", "\x1b]0;owned\x07.jpg", "latin\udce9.jpg"])


def test_load_image_never_blocks_and_names_the_reason(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageLoadError, match=r"pipe\.png: a FIFO \(named pipe\), not a regular file"):
        load_image(tmp_path / "pipe.png")
    with pytest.raises(ImageLoadError, match=r"photos: a folder, not a regular file"):
        load_image((tmp_path / "photos").mkdir() or tmp_path / "photos")
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path / "\x1b[2Jclear.png")
    assert "\x1b" not in str(e.value) and "'\\x1b[2Jclear.png'" not in str(e.value) and "\\x1b[2J" in str(e.value)


# --------------------------------------------------------------------------- unreadable files in a dataset


def make_dataset(root: Path, names: list[str]) -> Path:
    for name in names:
        good_image(root / "images" / name)
    (root / "labels.txt").write_text("".join(f"{n} 1 0 NA 1\n" for n in names))
    return root


def test_an_unreadable_labelled_image_is_skipped_with_one_warning(tmp_path):
    root = make_dataset(tmp_path, ["a.png", "b.png", "c.png"])
    (root / "images" / "b.png").unlink()
    os.mkfifo(root / "images" / "b.png")
    (root / "images" / "c.png").unlink()
    (root / "images" / "c.png").symlink_to(root / "images" / "gone.png")
    with pytest.warns(UserWarning) as record:
        index = index_dataset(root)
    [w] = [str(r.message) for r in record]
    assert w.startswith(f"{root / 'labels.txt'}: 2 labelled image(s) cannot be read, skipped: ")
    assert "b.png: a FIFO (named pipe)" in w and "c.png: broken symbolic link" in w
    assert index.table.names == ["a.png"] and set(index.unreadable) == {"b.png", "c.png"} and index.missing == []
    health = dataset_health(root)
    counts = health.counts()["count"]
    assert counts["unreadable images (skipped)"] == 2 and counts["usable images"] == 1


def test_training_on_a_dataset_with_a_fifo_does_not_hang(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", ["a.png", "b.png"])
    (root / "images" / "b.png").unlink()
    os.mkfifo(root / "images" / "b.png")
    os.unlink(root / "images" / "a.png")
    with pytest.warns(UserWarning, match=r"1 labelled image\(s\) cannot be read, skipped: .*b\.png: a FIFO"):
        rc, _, err = run_cli(["train", "--data", root, "--out", tmp_path / "m" / "model.pth", "--loss-plot", "",
                              "--weights", "none", "--precision", "fp32", "--no-progress"], capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.strip() == (f"error: {root / 'labels.txt'}: none of the 2 labelled images in {root / 'images'} can be "
                           "read (1 missing, 1 unreadable)")


def test_a_labels_file_that_is_a_fifo_is_an_error_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "labels.txt")
    (tmp_path / "images").mkdir()
    with pytest.raises(LabelFileError, match=r"labels\.txt: a FIFO \(named pipe\), not a regular file"):
        index_dataset(tmp_path)


@needs_permissions
def test_an_unlistable_subfolder_of_images_is_skipped_with_a_warning(tmp_path, unlock):
    root = make_dataset(tmp_path, ["a.png"])
    good_image(root / "images" / "locked" / "x.png")
    os.chmod(root / "images" / "locked", 0)
    unlock(root / "images" / "locked")
    with pytest.warns(UserWarning, match=r"1 subfolder\(s\) cannot be listed.*locked \(permission denied"):
        index = index_dataset(root)
    assert index.table.names == ["a.png"]


@needs_permissions
def test_an_unreadable_labels_file_is_a_one_line_error(tmp_path, unlock):
    root = make_dataset(tmp_path, ["a.png"])
    os.chmod(root / "labels.txt", 0)
    unlock(root / "labels.txt")
    with pytest.raises(LabelFileError, match=r"labels\.txt: cannot read it: permission denied \(EACCES\)"):
        parse_labels(root / "labels.txt")


# --------------------------------------------------------------------------- class 6: hostile bytes in labels.txt

HOSTILE_LABELS = [
    pytest.param(b"img_0.png 1 0 NA 1\nimg\x00_1.png 1 0 1 1\n",
                 r"labels\.txt line 2: image name 'img\\x00_1\.png' contains a NUL byte; names must be printable",
                 id="nul-in-name"),
    pytest.param(b"img_0.png 1 0 NA 1\n\x1b[31mimg_1.png 1 0 1 1\n",
                 r"labels\.txt line 2: image name '\\x1b\[31mimg_1\.png' contains the non-printable character "
                 r"'\\x1b'", id="ansi-escape-in-name"),
    pytest.param("img_0.png 1 0 NA 1\n\u202egnp.1_gmi 1 0 1 1\n".encode(),
                 r"labels\.txt line 2: image name '\\u202egnp\.1_gmi' contains the non-printable character "
                 r"'\\u202e'", id="bidi-override-in-name"),
    pytest.param(b"img_0.png 1 0 NA 1\nimg_1.png 1 \x00 1 1\n",
                 r"labels\.txt line 2: label 2 is '\\x00'; expected 1, 0 or NA", id="nul-as-label"),
    pytest.param(b"image Attr1 Attr\x1b[2J2 Attr3 Attr4\nimg_0.png 1 0 NA 1\n",
                 r"labels\.txt line 1: attribute name 'Attr\\x1b\[2J2' contains the non-printable",
                 id="ansi-in-header"),
    pytest.param(b"img_0.png 1 0 NA 1\x0c\nimg_1.png 1 0 1\n",
                 r"labels\.txt line 2: expected 4 labels after the file name, got 3",
                 id="form-feed-keeps-line-numbers"),
    pytest.param(b"img_0.png 1 0 NA 1\nIMG_0.PNG 1 1 NA 1\n",
                 r"labels\.txt line 2: image name 'IMG_0\.PNG' differs from 'img_0\.png' on line 1 only in letter "
                 r"case; on a case-insensitive disk they are one file, and their labels conflict", id="case-conflict"),
]


def _hostile_dataset(root: Path, data: bytes) -> Path:
    for i in range(2):
        good_image(root / "images" / f"img_{i}.png")
    (root / "labels.txt").write_bytes(data)
    return root


@pytest.mark.parametrize("data, error", HOSTILE_LABELS)
def test_hostile_labels_are_one_escaped_error_naming_the_line(tmp_path, data, error):
    root = _hostile_dataset(tmp_path, data)
    for call in (parse_labels, index_dataset):
        with pytest.raises(LabelFileError, match=error) as e:
            call(root / "labels.txt" if call is parse_labels else root)
        message = str(e.value)
        assert str(root / "labels.txt") in message and message.isprintable()


@pytest.mark.parametrize("data, error", HOSTILE_LABELS)
def test_hostile_labels_through_the_cli(tmp_path, capsys, data, error):
    root = _hostile_dataset(tmp_path / "data", data)
    rc, out, err = run_cli(["train", "--data", root, "--out", tmp_path / "m" / "model.pth", "--loss-plot", "",
                            "--weights", "none", "--precision", "fp32", "--no-progress"], capsys)
    assert rc == 1 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert str(root / "labels.txt") in line and line.isprintable()
    assert not any(c in err for c in "\x00\x1b\u202e")


def test_case_only_duplicates_with_agreeing_labels_are_a_warning_naming_both_lines(tmp_path):
    root = _hostile_dataset(tmp_path, b"img_0.png 1 0 NA 1\nimg_1.png 0 0 1 1\nIMG_0.png 1 0 NA 1\n")
    (root / "images" / "IMG_0.png").symlink_to(root / "images" / "img_0.png")  # one file, two names
    with pytest.warns(UserWarning) as record:
        table = parse_labels(root / "labels.txt")
    [w] = [str(r.message) for r in record]
    assert w == (f"{root / 'labels.txt'} line 3: image name 'IMG_0.png' differs from 'img_0.png' on line 1 only in "
                 "letter case; on a case-insensitive disk they are one file (their labels agree)")
    assert table.names == ["img_0.png", "img_1.png", "IMG_0.png"]
