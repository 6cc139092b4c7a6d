"""Evaluation: NA excluded, the majority baseline by hand, confidence intervals, thresholds and decisions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from aimonk import metrics
from aimonk.metrics import (
    THRESHOLD_GRID,
    apply_decisions,
    attribute_report,
    bootstrap_auc,
    choose_decisions,
    macro_average_precision,
    majority_f1,
    permutation_auc,
    report_to_json,
    summarize,
    threshold_sweep,
    tune_thresholds,
    verdict,
)

FAST = dict(n_boot=200, n_perm=50)


def labels_with_rate(rate: float, n: int = 100) -> np.ndarray:
    k = round(rate * n)
    return np.array([1] * k + [0] * (n - k))


def separable(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores where positives score clearly higher (AUC near 1)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    p = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.08, n), 0.01, 0.99)
    return y, p


# --------------------------------------------------------------------------- majority baseline


@pytest.mark.parametrize(("rate", "expected"), [(0.88, 2 * 0.88 / 1.88), (0.80, 2 * 0.8 / 1.8),
                                                (0.53, 2 * 0.53 / 1.53), (0.08, 0.0), (0.5, 2 * 0.5 / 1.5)])
def test_majority_f1_by_hand(rate, expected):
    y = labels_with_rate(rate)
    assert majority_f1(y) == pytest.approx(expected)
    majority = np.full_like(y, int(y.mean() >= 0.5))
    assert majority_f1(y) == pytest.approx(f1_score(y, majority, zero_division=0))


def test_macro_majority_f1_of_the_real_positive_rates():
    rates = [0.88, 0.80, 0.53, 0.08]
    macro = np.mean([majority_f1(labels_with_rate(r)) for r in rates])
    assert macro == pytest.approx((0.93617 + 0.88889 + 0.69281 + 0.0) / 4, abs=1e-4)
    assert round(macro, 2) == 0.63


def test_majority_f1_of_no_labels_is_nan():
    assert np.isnan(majority_f1(np.array([], dtype=int)))


# --------------------------------------------------------------------------- AUC intervals


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bootstrap_interval_contains_the_auc(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(80) < 0.5).astype(int)
    p = np.clip(0.5 + 0.15 * (y - 0.5) + rng.normal(0, 0.2, 80), 0, 1)  # a weak signal
    auc = roc_auc_score(y, p)
    lo, hi = bootstrap_auc(y, p, n_boot=300, seed=seed)
    assert lo <= auc <= hi
    assert 0.0 <= lo < hi <= 1.0
    assert bootstrap_auc(y, p, n_boot=300, seed=seed) == (lo, hi)  # seeded


def test_bootstrap_interval_of_a_separating_score_is_above_chance():
    y, p = separable()
    lo, hi = bootstrap_auc(y, p, n_boot=300)
    assert lo > 0.9 and hi == pytest.approx(1.0)


@pytest.mark.parametrize("y", [np.ones(10, int), np.zeros(10, int), np.array([], int)], ids=["all 1", "all 0", "none"])
def test_auc_interval_and_null_are_nan_without_both_classes(y):
    p = np.linspace(0, 1, len(y))
    assert all(np.isnan(v) for v in bootstrap_auc(y, p, n_boot=10))
    assert all(np.isnan(v) for v in permutation_auc(y, p, n_perm=10).values())


def test_permutation_null_is_centred_on_chance_and_rejects_a_real_signal():
    y, p = separable(80)
    null = permutation_auc(y, p, n_perm=100)
    assert null["lo"] < 0.5 < null["hi"]
    assert abs(null["mean"] - 0.5) < 0.05
    assert null["p_value"] == pytest.approx(1 / 101)


@pytest.mark.parametrize(
    ("auc", "lo", "hi", "start"),
    [(0.9, 0.8, 0.97, "learned signal"), (0.55, 0.4, 0.7, "no evidence the model beats chance"),
     (0.2, 0.1, 0.3, "worse than chance"), (float("nan"), float("nan"), float("nan"), "cannot tell")],
)
def test_verdicts(auc, lo, hi, start):
    assert verdict(auc, lo, hi).startswith(start)


# --------------------------------------------------------------------------- thresholds and decisions


def test_tune_thresholds_picks_the_best_f1_threshold():
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.3).astype(int)
    p = np.clip(0.2 + 0.2 * y + rng.normal(0, 0.12, 200), 0, 1)  # overlapping, and low: 0.5 is a poor threshold
    (chosen,) = tune_thresholds(y[:, None], p[:, None], ["a"])
    f1 = {round(float(t), 2): f1_score(y, p >= t, zero_division=0) for t in THRESHOLD_GRID}
    assert chosen in f1
    assert f1[chosen] == pytest.approx(max(f1.values()))
    assert f1[chosen] > f1[0.5]  # better than the default here


def test_tune_thresholds_takes_the_middle_of_a_tie_and_ignores_na():
    y = np.array([0, 0, 1, 1, -1, -1])
    p = np.array([0.1, 0.3, 0.6, 0.8, 0.99, 0.0])  # the NA rows would break the perfect split
    (chosen,) = tune_thresholds(y[:, None], p[:, None], ["a"])
    perfect = [t for t in THRESHOLD_GRID if 0.3 < t <= 0.6]  # 0.32 .. 0.60, all with F1 = 1
    assert chosen == pytest.approx(perfect[len(perfect) // 2])
    assert f1_score(y[:4], p[:4] >= chosen) == 1.0


def test_threshold_sweep_is_long_format_per_attribute():
    y, p = separable()
    sweep = threshold_sweep(np.stack([y, y], 1), np.stack([p, 1 - p], 1), ["a", "b"])
    assert list(sweep.columns) == ["attribute", "threshold", "precision", "recall", "f1"]
    assert len(sweep) == 2 * len(THRESHOLD_GRID)
    assert sweep[sweep.attribute == "a"].f1.max() > sweep[sweep.attribute == "b"].f1.max()


def test_choose_decisions_falls_back_to_majority_for_noise_and_keeps_thresholds_for_signal():
    rng = np.random.default_rng(0)
    n = 120
    y_sig, p_sig = separable(n)
    y_common = (rng.random(n) < 0.85).astype(int)
    y_rare = (rng.random(n) < 0.1).astype(int)
    targets = np.stack([y_sig, y_common, y_rare], 1)
    probs = np.stack([p_sig, rng.random(n), rng.random(n)], 1)  # scores of 2 and 3 are pure noise
    thresholds, decisions = choose_decisions(targets, probs, ["signal", "common", "rare"], n_boot=300)
    assert decisions == ["threshold", "majority_present", "majority_absent"]
    assert len(thresholds) == 3 and all(0 < t < 1 for t in thresholds)
    pred = apply_decisions(probs, thresholds, decisions)
    assert pred[:, 1].all() and not pred[:, 2].any()
    np.testing.assert_array_equal(pred[:, 0], probs[:, 0] >= thresholds[0])


def test_choose_decisions_uses_known_labels_only():
    y, p = separable(80)
    targets = np.where(np.arange(80) % 4 == 0, -1, y)[:, None]
    _, decisions = choose_decisions(targets, p[:, None], ["a"], n_boot=200)
    assert decisions == ["threshold"]


# --------------------------------------------------------------------------- the report


def test_attribute_report_excludes_na():
    y, p = separable(60)
    rng = np.random.default_rng(1)
    na = rng.random(60) < 0.3
    targets = np.where(na, -1, y)[:, None].astype(float)
    probs = np.where(na, 1 - p, p)[:, None]  # the NA rows get misleading scores: they must not count
    report = attribute_report(targets, probs, ["a"], **FAST)
    known = attribute_report(y[~na][:, None].astype(float), p[~na][:, None], ["a"], **FAST)
    row = report.loc["a"]
    assert row["n_known"] == (~na).sum()
    assert row["pos_rate"] == pytest.approx(y[~na].mean())
    assert row["roc_auc"] == pytest.approx(roc_auc_score(y[~na], p[~na]))
    assert row["ap"] == pytest.approx(average_precision_score(y[~na], p[~na]))
    assert row["f1"] == pytest.approx(f1_score(y[~na], p[~na] >= 0.5))
    for col in ["ap", "roc_auc", "auc_lo", "auc_hi", "precision", "recall", "f1", "majority_f1"]:
        assert row[col] == pytest.approx(known.loc["a", col]), col


def test_attribute_report_columns_thresholds_and_decisions():
    y, p = separable(50)
    targets = np.stack([y, y], 1).astype(float)
    probs = np.stack([p, p], 1)
    report = attribute_report(targets, probs, ["x", "y"], thresholds=[0.5, 0.9], decisions=["threshold", "majority_present"],
                              **FAST)
    assert list(report.index) == ["x", "y"]
    for col in ["n_known", "pos_rate", "ap", "roc_auc", "auc_lo", "auc_hi", "precision", "recall", "f1",
                "majority_f1", "verdict", "decision", "threshold"]:
        assert col in report.columns
    assert report.loc["y", "recall"] == 1.0  # majority_present predicts every image positive
    assert report.loc["y", "precision"] == pytest.approx(y.mean())
    assert report.loc["x", "verdict"].startswith("learned signal")


def test_a_single_class_attribute_gets_nan_metrics_not_an_error():
    targets = np.array([[1, 1], [1, 0], [1, 1], [-1, 0]], float)
    probs = np.array([[0.9, 0.8], [0.8, 0.1], [0.7, 0.7], [0.1, 0.4]])
    report = attribute_report(targets, probs, ["only1", "both"], **FAST)
    assert np.isnan(report.loc["only1", "roc_auc"]) and np.isnan(report.loc["only1", "ap"])
    assert report.loc["only1", "verdict"].startswith("cannot tell")
    assert report.loc["both", "roc_auc"] == 1.0
    as_json = report_to_json(report)
    json.dumps(as_json, allow_nan=False)  # NaN became null
    assert as_json["attributes"]["only1"]["roc_auc"] is None
    assert as_json["macro"]["macro_roc_auc"] == 1.0  # the mean skips the NaN


def test_summarize_gives_macro_means():
    y, p = separable(40)
    report = attribute_report(np.stack([y, 1 - y], 1).astype(float), np.stack([p, p], 1), ["a", "b"], **FAST)
    s = summarize(report)
    for col in ["ap", "roc_auc", "precision", "recall", "f1", "majority_f1", "pos_rate"]:
        assert s[f"macro_{col}"] == pytest.approx(report[col].mean())


def test_macro_average_precision_ignores_na_and_single_class_attributes():
    targets = np.array([[1, 1, 0], [0, 1, 1], [1, 1, -1], [-1, 1, 0]], float)
    probs = np.array([[0.9, 0.5, 0.2], [0.2, 0.5, 0.8], [0.6, 0.5, 0.99], [0.0, 0.5, 0.3]])
    # attribute 1: perfect (AP 1); attribute 2: one class only (skipped); attribute 3: perfect on known rows.
    assert macro_average_precision(targets, probs) == 1.0
    assert np.isnan(macro_average_precision(np.ones((3, 1)), np.ones((3, 1))))


def test_choose_decisions_prefers_majority_when_the_tuned_threshold_loses_to_it():
    # A real but weak ranking on a 90 % positive attribute: the AUC interval is above 0.5, yet no
    # grid threshold beats "always present" on F1, so the majority rule must be kept.
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(180), np.zeros(20)]
    p = np.where(y == 1, rng.uniform(0.0, 1.0, 200), rng.uniform(0.0, 0.3, 200))
    targets = y[:, None].astype(np.float32)
    lo, _ = metrics.bootstrap_auc(y.astype(int), p)
    assert lo > 0.5
    thresholds, decisions = metrics.choose_decisions(targets, p[:, None], ["A"])
    tuned_f1 = metrics.attribute_report(targets, p[:, None], ["A"], thresholds)["f1"].iloc[0]
    assert tuned_f1 < metrics.majority_f1(y.astype(int))
    assert decisions == ["majority_present"]
