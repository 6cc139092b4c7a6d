"""The label audit: confident learning per attribute on known labels, the signal gate, duplicates, the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from aimonk import features
from aimonk.audit import (
    DUPLICATE_SCORE,
    audit,
    confident_learning,
    conflicting_duplicates,
    cross_fitted_probabilities,
    duplicate_groups,
    score_labels,
)
from aimonk.cli import main
from helpers import sample_subset


def test_confident_learning_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.1, 0.2, 0.1, 0.7])
    score, flagged, (t0, t1) = confident_learning(y, p)
    assert t1 == pytest.approx(0.6)  # mean p over the 1s
    assert t0 == pytest.approx((0.8 + 0.9 + 0.3) / 3)  # mean (1 - p) over the 0s
    assert flagged.tolist() == [False, False, True, False, False, True]
    np.testing.assert_allclose(score, [0.1, 0.2, 0.9, 0.2, 0.1, 0.7])  # 1 - p(given label)
    assert np.argsort(-score)[:2].tolist() in ([2, 5], [5, 2])


def synthetic(n=300, n_attr=3, flip=0.1, na=0.1, signal=True, seed=0):
    """Features that carry the true labels (or not), labels with ``flip`` of the known ones flipped and ``na`` NA."""
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, n_attr)) < 0.35).astype(np.float32)
    feats = rng.normal(size=(n, 16)).astype(np.float32)
    if signal:
        feats[:, :n_attr] += 2.5 * truth
    given = truth.copy()
    flipped = rng.random(truth.shape) < flip
    given[flipped] = 1 - given[flipped]
    given[rng.random(truth.shape) < na] = -1
    return feats, given, flipped & (given >= 0)


def test_flipped_labels_rank_first_and_na_is_never_scored():
    feats, given, flipped = synthetic()
    names = [f"img_{i}.jpg" for i in range(len(given))]
    probs = cross_fitted_probabilities(feats, given, names, n_folds=5)
    result = score_labels(names, given, probs, ["A", "B", "C"])
    cells = result.label_scores
    assert len(cells) == int((given >= 0).sum())  # every known cell once, no NA cell
    assert set(result.audited) == {"A", "B", "C"}
    truth = np.array([flipped[int(n.split("_")[1].split(".")[0]), "ABC".index(a)]
                      for n, a in zip(cells["image"], cells["attribute"])])
    assert roc_auc_score(truth, cells["score"]) >= 0.9
    top = result.suspects(int(truth.sum()))
    hits = {(n, a) for n, a in zip(cells["image"][truth], cells["attribute"][truth])}
    precision = np.mean([(n, a) in hits for n, a in zip(top["image"], top["attribute"])])
    assert precision > 3 * truth.mean()  # well above picking cells at random


def test_cross_fitting_keeps_copies_of_an_image_in_one_fold():
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(60), 2)  # 60 images, each listed twice
    feats = np.eye(60, dtype=np.float32)[group]  # features that identify the image and nothing else
    labels = rng.integers(0, 2, (60, 1)).astype(np.float32)[group]  # labels with no learnable rule
    leaky = cross_fitted_probabilities(feats, labels, [str(i) for i in range(120)], n_folds=5, C=1.0, rounds=1)
    grouped = cross_fitted_probabilities(feats, labels, [str(g) for g in group], n_folds=5, C=1.0, rounds=1)
    assert roc_auc_score(labels[:, 0], leaky[:, 0]) > 0.9  # a copy in the fit gives its label away...
    assert roc_auc_score(labels[:, 0], grouped[:, 0]) < 0.65  # ...so copies are held out together


def test_no_signal_means_no_suspects_and_says_so():
    feats, given, _ = synthetic(signal=False, flip=0.0)
    names = [f"img_{i}" for i in range(len(given))]
    result = score_labels(names, given, cross_fitted_probabilities(feats, given, names), ["A", "B", "C"])
    assert result.audited == []
    assert len(result.suspects()) == 0
    assert len(result.label_scores) == int((given >= 0).sum())  # still scored, marked as ungated
    assert not result.label_scores["signal"].any()
    assert "cannot tell wrong labels from right ones" in result.summary()
    assert "No attribute shows signal" in result.summary()


def test_duplicate_groups_identical_and_near():
    hashes = np.array([0b0, 0b1111, 0b1_1111_0000_0000, 0xFFFF << 40, 0xFFFF_FFFF], np.uint64)
    digests = ["a", "b", "c", "d", "d"]
    groups = duplicate_groups(digests, hashes, near_bits=4)
    assert sorted((k, sorted(g)) for k, g in groups) == [("identical", [3, 4]), ("near-identical", [0, 1])]


def test_conflicts_ignore_na_and_rank_first():
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    targets = np.array([[1, 0], [0, -1], [1, 1], [1, 1]], np.float32)
    groups = [("identical", [0, 1]), ("near-identical", [2, 3])]
    conflicts = conflicting_duplicates(names, targets, ["A", "B"], groups)
    assert [c["conflicting"] for c in conflicts] == [["A"]]  # an NA next to a known label is no conflict
    assert conflicts[0]["labels"] == {"a.jpg": ["1", "0"], "b.jpg": ["0", "NA"]}
    probs = np.full(targets.shape, 0.5, np.float32)
    result = score_labels(names, targets, probs, ["A", "B"], groups)
    top = result.suspects(2)
    assert set(zip(top["image"], top["attribute"])) == {("a.jpg", "A"), ("b.jpg", "A")}
    assert (top["score"] == DUPLICATE_SCORE["identical"]).all() and (top["copies"] == "identical").all()


def test_json_is_plain_and_complete():
    feats, given, _ = synthetic(n=80)
    names = [f"img_{i}" for i in range(len(given))]
    result = score_labels(names, given, cross_fitted_probabilities(feats, given, names, n_folds=3), ["A", "B", "C"])
    out = json.loads(json.dumps(result.to_json(top=5)))  # no numpy types, no NaN
    assert out["attributes"] == ["A", "B", "C"]
    assert len(out["label_scores"]) == int((given >= 0).sum())
    cell = out["label_scores"][0]
    assert {"image", "attribute", "score"} <= set(cell) and isinstance(cell["score"], float)
    assert set(out["signal"]) == {"A", "B", "C"} and isinstance(out["signal"]["A"]["signal"], bool)
    assert out["duplicates"] == [] and len(out["suspects"]) == 5


@pytest.mark.slow
def test_audit_on_the_sample_caches_features(tmp_path, monkeypatch):
    data = sample_subset(tmp_path / "data", 40)
    kwargs = dict(backbones=("efficientnet_lite0",), image_size=64, n_folds=3, cache_dir=tmp_path / "cache",
                  progress=False)
    first = audit(data, **kwargs)
    assert len(first.names) == 40 and first.settings["labels"].endswith("labels.txt")

    def no_network(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(features, "feature_probe", no_network)
    second = audit(data, **kwargs)
    np.testing.assert_allclose(second.probabilities, first.probabilities, atol=1e-6)


@pytest.mark.slow
def test_cli_audit_json_and_text(tmp_path, capsys):
    data = sample_subset(tmp_path / "data", 40)
    args = ["audit", "--data", str(data), "--backbones", "efficientnet_lite0", "--image-size", "64", "--folds", "3"]
    assert main([*args, "--json", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attributes"] == ["Attr1", "Attr2", "Attr3", "Attr4"]
    assert len(out["suspects"]) <= 3 and out["settings"]["folds"] == 3
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Signal gate" in text and "Attr1" in text


def test_cli_audit_bad_folder_is_one_line(tmp_path, capsys):
    assert main(["audit", "--data", str(tmp_path / "nowhere")]) == 1
    assert "data folder not found" in capsys.readouterr().err


@pytest.mark.slow
def test_the_slow_option_scores_each_fold_with_a_network_trained_without_it(tmp_path):
    data = sample_subset(tmp_path / "data", 30)
    tiny = dict(epochs=1, batch_size=8, image_size=32, weights="none", precision="fp32", device="cpu",
                probe_ensemble=False, tta=False, keep_best=False, head_init="random", val_fraction=0.2,
                cache_dir=str(tmp_path / "cache"))
    result = audit(data, n_folds=3, method="finetune", recipe="pretrained", train_overrides=tiny,
                   cache_dir=tmp_path / "cache", image_size=32, progress=False)
    assert result.settings["method"] == "finetune" and result.settings["backbones"] == []
    assert len(result.names) == 30 and not np.isclose(result.probabilities, 0.5).all()  # every fold was scored
    assert len(result.label_scores) == int((result.targets >= 0).sum())
