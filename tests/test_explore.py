"""Dataset-health helpers on a tiny synthetic folder with every kind of problem in it."""

import warnings

import numpy as np
import pytest
from PIL import Image

from aimonk.data import index_dataset
from aimonk.explore import (
    dataset_health,
    describe_image,
    find_duplicates,
    image_table,
    label_counts,
    label_string,
    mode_summary,
    size_summary,
)
from aimonk.train import TrainConfig, prepare_data


def _save(path, mode, size, seed, fmt=None):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _save(images / "a.jpg", "RGB", (40, 30), 1)
    _save(images / "b.png", "RGBA", (20, 20), 2)
    _save(images / "c.jpg", "L", (30, 40), 3)
    (images / "d.jpg").write_bytes((images / "a.jpg").read_bytes())  # copy of a, conflicting labels
    _save(images / "e.jpg", "RGB", (16, 16), 5)
    (images / "f.jpg").write_bytes((images / "e.jpg").read_bytes())  # copy of e, NA vs known only
    (images / "g.jpg").write_bytes(b"not an image at all")  # unreadable
    _save(images / "h.jpg", "RGB", (24, 24), 8)
    _save(images / "stray.jpg", "RGB", (8, 8), 9)  # unlisted
    (tmp_path / "labels.txt").write_text(
        "a.jpg 1 0 NA\n"
        "b.png 0 1 1\n"
        "c.jpg 1 NA 0\n"
        "d.jpg 0 0 1\n"
        "e.jpg 1 1 0\n"
        "f.jpg NA 1 0\n"
        "g.jpg 1 1 1\n"
        "h.jpg 0 0 0\n"
        "gone.jpg 1 0 0\n"  # missing
    )
    return tmp_path


@pytest.fixture
def health(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing-image warning is tested in the data tests
        return dataset_health(folder)


def test_counts(health):
    c = health.counts()["count"]
    assert c["rows in labels.txt"] == 9
    assert c["images present (labelled)"] == 8
    assert c["labelled but missing"] == 1
    assert c["unlisted images (ignored)"] == 1
    assert c["unreadable images (skipped)"] == 1
    assert c["usable images"] == 7
    assert c["byte-identical groups"] == 2
    assert c["... with conflicting labels"] == 1


def test_image_table_modes_sizes_and_errors(health):
    t = health.images
    assert t.loc["a.jpg", ["mode", "format", "width", "height"]].tolist() == ["RGB", "JPEG", 40, 30]
    assert t.loc["b.png", "mode"] == "RGBA" and t.loc["c.jpg", "mode"] == "L"
    assert "not a recognised image" in t.loc["g.jpg", "error"]
    assert t.loc["a.jpg", "digest"] == t.loc["d.jpg", "digest"] != t.loc["e.jpg", "digest"]
    assert health.unreadable.index.tolist() == ["g.jpg"]
    modes = mode_summary(t)
    assert modes["images"].sum() == 8
    assert set(zip(modes["format"], modes["mode"])) == {("JPEG", "RGB"), ("PNG", "RGBA"), ("JPEG", "L"), ("?", "?")}
    sizes = size_summary(t)
    assert sizes.loc["width", "min"] == 16 and sizes.loc["height", "max"] == 40 and sizes.loc["width", "count"] == 7


def test_describe_image_of_an_empty_file(tmp_path):
    (tmp_path / "z.jpg").write_bytes(b"")
    row = describe_image(tmp_path / "z.jpg")
    assert row["bytes"] == 0 and "empty" in row["error"]


def test_find_duplicates_flags_conflicts_but_not_na(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = index_dataset(folder)
    d = find_duplicates(index)
    assert d["name"].tolist() == ["a.jpg", "d.jpg", "e.jpg", "f.jpg"]
    assert d["group"].tolist() == [1, 1, 2, 2]
    assert d["conflict"].tolist() == [True, True, False, False]
    assert d.loc[0, "conflicting"] == "Attr1"  # Attr2 agrees (0, 0), Attr3 is NA in one copy
    assert d.loc[1, ["Attr1", "Attr2", "Attr3"]].tolist() == ["0", "0", "1"]


def test_no_duplicates_gives_an_empty_frame_with_columns(folder):
    (folder / "labels.txt").write_text("a.jpg 1\nb.png 0\n")
    d = find_duplicates(index_dataset(folder, warn=False))
    assert d.empty and "conflict" in d.columns


def test_duplicate_message_warns_about_label_quality(health):
    msg = health.duplicate_message()
    assert "Label-quality warning" in msg and "1 of 2" in msg and "Attr1" in msg


def test_label_counts_and_strings():
    t = np.array([[1, 0, -1], [1, -1, -1], [0, 0, -1]], dtype=np.float32)
    c = label_counts(t, ["A", "B", "C"])
    assert c[["1", "0", "NA"]].values.tolist() == [[2, 1, 0], [0, 2, 1], [0, 0, 3]]
    assert c.loc["A", "positive rate (known)"] == pytest.approx(2 / 3, abs=1e-3)
    assert np.isnan(c.loc["C", "positive rate (known)"])
    assert label_string(t[0], ["A", "B", "C"]) == "A | NA: C"
    assert label_string(t[2], ["A", "B", "C"]) == "none present | NA: C"


def test_training_pos_weight_matches_what_training_uses(health, folder, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = TrainConfig(data_dir=str(folder), image_size=16, val_fraction=0.3, seed=0,
                          cache_dir=str(tmp_path / "cache"), progress=False)
        index, cache, train_idx, _ = prepare_data(cfg)
        from aimonk.losses import compute_pos_weight

        expected = compute_pos_weight(index.table.targets[train_idx]).numpy()
        shown = health.training_pos_weight(val_fraction=0.3, seed=0)
    np.testing.assert_allclose(shown["pos_weight (training split)"].to_numpy(), expected, atol=1e-3)
    assert shown.index.tolist() == ["Attr1", "Attr2", "Attr3"]


def test_sample_returns_thumbnails_with_captions(health):
    images, titles = health.sample(n=4, seed=1, thumb=12)
    assert len(images) == len(titles) == 4
    assert all(max(im.size) <= 12 and im.mode == "RGB" for im in images)
    assert all("\n" in t for t in titles) and not any(t.startswith("g.jpg") for t in titles)


def test_image_table_keeps_given_names(folder):
    t = image_table([folder / "images" / "a.jpg"], names=["sub/a.jpg"], workers=1)
    assert t.index.tolist() == ["sub/a.jpg"]
