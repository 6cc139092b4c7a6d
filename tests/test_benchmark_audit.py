"""The audit benchmark's parts: the synthetic flips, the ranking figures, the cleaning experiment, a review log."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aimonk.audit import cross_fitted_probabilities, score_labels
from aimonk.benchmark.audit import cleaning_experiment, flip_labels, manual_review, ranking_scores
from aimonk.benchmark.report import render_audit


def test_flip_labels_flips_the_share_of_known_cells_only():
    targets = np.array([[1, 0, -1], [0, -1, 1], [1, 1, 0], [-1, 0, 0]] * 25, np.float32)
    noisy, flipped = flip_labels(targets, 0.2, seed=3)
    known = targets >= 0
    assert flipped.sum() == round(0.2 * known.sum()) and not (flipped & ~known).any()
    np.testing.assert_array_equal(noisy[flipped], 1 - targets[flipped])
    np.testing.assert_array_equal(noisy[~flipped], targets[~flipped])
    assert np.array_equal(flip_labels(targets, 0.2, seed=3)[1], flipped)  # reproducible


def _synthetic(n=240, seed=0):
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, 2)) < 0.4).astype(np.float32)
    feats = rng.normal(size=(n, 8)).astype(np.float32)
    feats[:, :2] += 3 * truth
    return feats, truth, [f"img_{i}" for i in range(n)]


@pytest.mark.slow
def test_ranking_and_cleaning_figures_on_synthetic_features():
    feats, truth, names = _synthetic()
    noisy, flipped = flip_labels(truth, 0.1, seed=0)
    result = score_labels(names, noisy, cross_fitted_probabilities(feats, noisy, names, 5), ["A", "B"])
    s = ranking_scores(result, flipped, {n: i for i, n in enumerate(names)})
    assert s["n_flipped"] == flipped.sum() and s["n_scored"] == noisy.size
    assert s["auroc"] > 0.9 and 0 <= s["precision_at_50"] <= 1
    rows = cleaning_experiment(feats, truth, noisy, names, names, ["A", "B"], folds=3, seed=0)
    assert {r["labels"] for r in rows} == {"noisy", "drop flagged images", "flagged labels to NA",
                                           "true labels (ceiling)"}
    assert len(rows) == 12 and all(0 < r["macro_ap"] <= 1 for r in rows)
    dropped = [r for r in rows if r["labels"] == "drop flagged images"]
    assert all(r["n_train_images"] < 160 for r in dropped)  # 2/3 of 240 before dropping


def test_manual_review_counts_the_log_against_the_top_suspects(tmp_path):
    top = [{"image": f"{i}.jpg", "attribute": "A"} for i in range(5)]
    log = tmp_path / "review_log.jsonl"
    log.write_text("\n".join(json.dumps({"image": f"{i}.jpg", "attribute": "A", "action": a})
                             for i, a in enumerate(["flip", "na", "keep", "flip"])) + "\n")
    counts = manual_review(top, str(log))
    assert (counts["real tagging error"], counts["ambiguous"], counts["label right"], counts["not reviewed"]) == (2, 1, 1, 1)


def test_render_audit_states_the_gate_and_the_figures():
    record = {"benchmark": "audit", "data": "d", "noise": 0.1, "seed": 0,
              "settings": {"backbones": ["efficientnet_lite0"], "folds": 5, "C": 0.01},
              "run": {"machine": {"cpu": "cpu", "cores": 2, "torch_threads": 2}, "command": "python -m ...",
                      "date": "2026-12-02", "versions": {"python": "3.11", "torch": "2", "torchvision": "0",
                                                         "aimonk": "0", "git_commit": "abc"}},
              "real": {"n_images": 3, "n_known": 6, "top_suspects": [],
                       "duplicates": [{"kind": "identical", "labels": {"a.jpg": ["1"], "b.jpg": ["0"]},
                                       "conflicting": ["A"]}],
                       "signal": {"A": {"n_known": 3, "n_positive": 1, "auc": 0.5, "auc_lo": 0.4, "auc_hi": 0.6,
                                        "signal": False, "n_flagged": 0}}},
              "synthetic": {"n_flipped": 1, "n_scored": 6, "auroc": 0.95, "precision_at_50": 0.5,
                            "precision_at_100": 0.5, "n_flagged": 1, "flagged_precision": 1.0, "flagged_recall": 1.0,
                            "auroc_per_attribute": {"A": 0.95}, "ablations_auroc": {"one round": 0.9}},
              "cleaning": {"folds": 1, "rows": [{"fold": 0, "labels": "noisy", "macro_ap": 0.7}]}}
    text = render_audit(record, "x.json")
    assert "no signal, labels cannot be judged" in text and "| 1 | 6 | 0.950 |" in text
    assert "1 byte-identical group(s)" in text and "| identical | a.jpg (1); b.jpg (0) | A |" in text
    assert "1 byte-identical group(s)" in text and "one round 0.900" in text and "| noisy | 0.700 |" in text
