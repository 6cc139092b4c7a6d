"""The label review: decisions go to labels.reviewed.txt and a log; the labels under review never change."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aimonk.audit import score_labels
from aimonk.data import file_digest, parse_labels
from aimonk.review import LabelReview, ReviewError, format_labels
from aimonk.review_panel import ReviewPanel
from helpers import sample_subset


@pytest.fixture
def data(tmp_path):
    return sample_subset(tmp_path / "data", 12)


def test_decisions_write_reviewed_labels_and_a_log(data, tmp_path):
    before = (data / "labels.txt").read_bytes()
    table = parse_labels(data / "labels.txt")
    a, b, c = table.names[:3]
    review = LabelReview(data / "labels.txt", tmp_path / "review", reviewer="tester")
    old_a1 = table.targets[0, 0]
    review.decide(a, "Attr1", "flip", score=0.9)
    review.decide(b, "Attr2", "na")
    review.decide(c, None, "drop")
    review.decide(table.names[3], "Attr3", "keep")
    reviewed = parse_labels(review.reviewed_path)
    assert (data / "labels.txt").read_bytes() == before  # data is immutable
    assert reviewed.names == [n for n in table.names if n != c]
    if old_a1 >= 0:
        assert reviewed.targets[0, 0] == 1 - old_a1
    assert reviewed.targets[1, 1] == -1
    np.testing.assert_array_equal(reviewed.targets[2:], table.targets[3:])  # keep changes nothing
    log = [json.loads(line) for line in review.log_path.read_text().splitlines()]
    assert [e["action"] for e in log] == ["flip", "na", "drop", "keep"]
    assert {e["reviewer"] for e in log} == {"tester"} and all(e["time"] and e["labels_sha256"] for e in log)
    assert log[0]["score"] == 0.9 and log[2]["new"] == "dropped"


def test_a_reopened_review_replays_its_log_and_the_last_decision_wins(data, tmp_path):
    name = parse_labels(data / "labels.txt").names[0]
    first = LabelReview(data / "labels.txt", tmp_path / "review")
    first.decide(name, "Attr1", "flip")
    first.decide(name, "Attr1", "flip")  # flipping twice is still one flip of the original label
    again = LabelReview(data / "labels.txt", tmp_path / "review")
    assert again.decided() == {(name, "Attr1"): "flip"}
    again.decide(name, "Attr1", "keep")
    original = parse_labels(data / "labels.txt").targets[0]
    np.testing.assert_array_equal(parse_labels(again.reviewed_path).targets[0], original)
    assert len(again.log_path.read_text().splitlines()) == 3


@pytest.mark.parametrize("image, attribute, action, message", [
    ("nope.jpg", "Attr1", "flip", "no image named"),
    (None, "Attr9", "flip", "no attribute"),
    (None, "Attr1", "delete", "unknown action"),
    (None, None, "flip", "needs an attribute"),
])
def test_bad_decisions_are_refused_and_write_nothing(data, tmp_path, image, attribute, action, message):
    review = LabelReview(data / "labels.txt", tmp_path / "review")
    with pytest.raises(ReviewError, match=message):
        review.decide(image or review.table.names[0], attribute, action)
    assert not review.log_path.exists() and not review.reviewed_path.exists()


def test_a_review_never_overwrites_the_labels_under_review(data):
    (data / "labels.reviewed.txt").write_text((data / "labels.txt").read_text())
    with pytest.raises(ReviewError, match="would overwrite"):
        LabelReview(data / "labels.reviewed.txt", data)


def test_a_damaged_log_is_named_with_its_line(data, tmp_path):
    (tmp_path / "review").mkdir()
    (tmp_path / "review" / "review_log.jsonl").write_text('{"labels_sha256": "x", "image": "a"}\nnot json\n')
    with pytest.raises(ReviewError, match=r"review_log.jsonl line 2"):
        LabelReview(data / "labels.txt", tmp_path / "review")


def test_named_attributes_keep_their_header(tmp_path):
    (tmp_path / "labels.txt").write_text("image hat scarf\na.jpg 1 NA\nb.jpg 0 1\n")
    table = parse_labels(tmp_path / "labels.txt")
    assert format_labels(table) == "image hat scarf\na.jpg 1 NA\nb.jpg 0 1\n"
    assert parse_labels(tmp_path / "labels.txt").attributes == ["hat", "scarf"]


def _result(data):
    """An audit result over ``data`` with made-up scores: Attr1 has signal, Attr2 has none."""
    table = parse_labels(data / "labels.txt")
    names, targets = table.names, table.targets
    rng = np.random.default_rng(0)
    probs = np.where(targets >= 0, np.abs(targets - 0.1), 0.5).astype(np.float32)
    probs[:, 1] = rng.random(len(names))  # no signal in Attr2
    probs[0, 0] = 1 - probs[0, 0]  # image 0 disputes its Attr1
    result = score_labels(names, targets, probs, table.attributes, n_boot=200)
    result.settings["labels"] = str(data / "labels.txt")
    result.signal.loc["Attr1", "signal"] = True  # 12 images are too few for the gate; the panel is under test
    result.label_scores["signal"] = result.label_scores["attribute"] == "Attr1"
    return result


def test_panel_clicks_write_the_reviewed_file_and_the_log(data, tmp_path):
    before = (data / "labels.txt").read_bytes()
    result = _result(data)
    review = LabelReview(data / "labels.txt", tmp_path / "review", reviewer="tester")
    panel = ReviewPanel(result, review, data / "images", top=5)
    assert "not audited" in panel.gate.value and "Attr2" in panel.gate.value
    assert set(panel.suspects["attribute"]) == {"Attr1"}  # no suspects from an attribute without signal
    first = panel.current
    assert bytes(panel.image.value).startswith(b"\x89PNG") and first["image"] in panel.info.value
    panel.buttons["flip"].click()
    assert panel.i == 1 and "saved" in panel.status.value
    second = panel.current
    panel.buttons["drop"].click()
    reviewed = parse_labels(review.reviewed_path)
    assert second["image"] not in reviewed.names
    row = reviewed.names.index(first["image"])
    assert reviewed.targets[row, 0] == 1 - first["label"]
    log = [json.loads(line) for line in review.log_path.read_text().splitlines()]
    assert [(e["image"], e["action"]) for e in log] == [(first["image"], "flip"), (second["image"], "drop")]
    assert (data / "labels.txt").read_bytes() == before
    reopened = ReviewPanel(result, LabelReview(data / "labels.txt", tmp_path / "review"), data / "images", top=5)
    assert reopened.i == 2  # starts at the first suspect without a decision


def test_panel_reports_a_failed_save_and_stays(data, tmp_path, monkeypatch):
    review = LabelReview(data / "labels.txt", tmp_path / "review")
    panel = ReviewPanel(_result(data), review, data / "images", top=3)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("aimonk.review.atomic_write_text", disk_full)
    panel.buttons["keep"].click()
    assert panel.i == 0 and "Not saved" in panel.status.value and "No space left" in panel.status.value


@pytest.mark.slow
def test_training_and_evaluation_read_the_reviewed_labels(data, tmp_path, capsys):
    from aimonk.checkpoint import load_checkpoint
    from aimonk.cli import main
    from aimonk.data import load_split
    from aimonk.evaluate import score_folder
    from aimonk.train import train
    from helpers import tiny_config

    table = parse_labels(data / "labels.txt")
    review = LabelReview(data / "labels.txt", tmp_path / "review")
    review.decide(table.names[0], None, "drop")
    review.decide(table.names[1], "Attr1", "na")
    cfg = tiny_config(data, tmp_path / "model.pth", tmp_path / "cache", labels=str(review.reviewed_path),
                      val_fraction=0.25)
    result = train(cfg)
    split = load_split(tmp_path / "split.json")
    assert table.names[0] not in split["train"] + split["val"]  # the dropped image is not trained on
    assert split["labels"] == str(review.reviewed_path)
    meta = load_checkpoint(result.checkpoint)[1]
    assert meta.data["labels"] == str(review.reviewed_path)
    assert meta.data["labels_sha256"] == file_digest(review.reviewed_path)
    targets, _, names, _ = score_folder(result.checkpoint, data, labels=review.reviewed_path)
    assert table.names[0] not in names and targets[names.index(table.names[1]), 0] == -1
    assert main(["evaluate", "--model", str(result.checkpoint), "--data", str(data),
                 "--labels", str(review.reviewed_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == len(table) - 1
