"""Metrics on numpy arrays, NA-aware: AP, AUC with bootstrap and permutation, threshold sweeps,
decision rules and the majority baseline. Labels are (N, n_attributes) with -1 for NA."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

THRESHOLD_GRID = np.round(np.arange(0.02, 0.99, 0.02), 2)


def _known(targets: np.ndarray, probs: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    m = targets[:, j] >= 0
    return targets[m, j].astype(int), probs[m, j]


def _both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def macro_average_precision(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean AP over attributes that have both classes among their known labels (NaN if none)."""
    aps = [average_precision_score(y, p) for y, p in (_known(targets, probs, j) for j in range(targets.shape[1]))
           if _both_classes(y)]
    return float(np.mean(aps)) if aps else float("nan")


def _rank_auc(y: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """ROC-AUC from ranks (Mann-Whitney U), row-wise for 2-D inputs; NaN where a class is missing."""
    n_pos = y.sum(-1)
    n_neg = y.shape[-1] - n_pos
    u = (ranks * y).sum(-1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def bootstrap_auc(y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval for ROC-AUC (NaN if a class is missing)."""
    if not _both_classes(y):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(y), (n_boot, len(y)))  # (n_boot, N) resampled rows
    stats = _rank_auc(y[i].astype(float), rankdata(p[i], axis=1))
    stats = stats[~np.isnan(stats)]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def permutation_auc(y: np.ndarray, p: np.ndarray, n_perm: int = 200, seed: int = 0) -> dict:
    """Chance reference: AUC of the same scores against shuffled labels.

    Returns:
        ``{"mean", "lo", "hi", "p_value"}``: the null AUC distribution's mean and 95 % range, and
        the share of shuffles that score at least the observed AUC.
    """
    if not _both_classes(y):
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "p_value": float("nan")}
    rng = np.random.default_rng(seed)
    ranks = rankdata(p)
    observed = _rank_auc(y.astype(float), ranks)
    shuffled = np.stack([rng.permutation(y) for _ in range(n_perm)]).astype(float)  # (n_perm, N)
    null = _rank_auc(shuffled, ranks)
    return {"mean": float(null.mean()), "lo": float(np.percentile(null, 2.5)), "hi": float(np.percentile(null, 97.5)),
            "p_value": float((1 + (null >= observed - 1e-12).sum()) / (1 + n_perm))}


def majority_f1(y: np.ndarray) -> float:
    """F1 (positive class) of always predicting the majority class."""
    if len(y) == 0:
        return float("nan")
    rate = y.mean()
    return float(2 * rate / (1 + rate)) if rate >= 0.5 else 0.0


def threshold_sweep(targets: np.ndarray, probs: np.ndarray, attributes: Sequence[str],
                    grid: np.ndarray = THRESHOLD_GRID) -> pd.DataFrame:
    """Precision, recall and F1 per attribute over a grid of thresholds (long format, for plotting)."""
    rows = []
    for j, a in enumerate(attributes):
        y, p = _known(targets, probs, j)
        for t in grid:
            pr, rc, f1, _ = precision_recall_fscore_support(y, p >= t, average="binary", zero_division=0)
            rows.append({"attribute": a, "threshold": float(t), "precision": pr, "recall": rc, "f1": f1})
    return pd.DataFrame(rows)


def tune_thresholds(targets: np.ndarray, probs: np.ndarray, attributes: Sequence[str]) -> list[float]:
    """Per attribute, the grid threshold with the best F1 on these (validation) labels; ties go to the middle."""
    sweep = threshold_sweep(targets, probs, attributes)
    out = []
    for a in attributes:
        s = sweep[sweep.attribute == a]
        best = s[s.f1 >= s.f1.max() - 1e-12].threshold.to_numpy()
        out.append(float(best[len(best) // 2]) if len(best) else 0.5)
    return out


def verdict(auc: float, lo: float, hi: float) -> str:
    """A plain sentence on whether the model beats chance for one attribute."""
    if np.isnan(auc):
        return "cannot tell: validation has only one class among known labels"
    ci = f"AUC {auc:.2f}, 95% CI {lo:.2f}-{hi:.2f}"
    if lo > 0.5:
        return f"learned signal ({ci})"
    if hi < 0.5:
        return f"worse than chance ({ci})"
    return f"no evidence the model beats chance ({ci})"


def has_signal(lo: float) -> bool:
    """Evidence of signal: the AUC interval's lower end is above 0.5."""
    return bool(lo > 0.5)


def choose_decisions(targets: np.ndarray, probs: np.ndarray, attributes: Sequence[str],
                     n_boot: int = 1000, seed: int = 0) -> tuple[list[float], list[str]]:
    """Per attribute: a tuned threshold where validation shows signal and it beats the majority rule there,
    else the majority decision.

    Returns:
        ``(thresholds, decisions)``; a decision is ``"threshold"``, ``"majority_present"`` or
        ``"majority_absent"``.
    """
    thresholds = tune_thresholds(targets, probs, attributes)
    decisions = []
    for j in range(len(attributes)):
        y, p = _known(targets, probs, j)
        lo, _ = bootstrap_auc(y, p, n_boot, seed)
        tuned_f1 = precision_recall_fscore_support(y, p >= thresholds[j], average="binary", zero_division=0)[2] \
            if len(y) else 0.0
        # A threshold is used only with evidence of signal AND when it beats the majority rule on validation.
        if has_signal(lo) and tuned_f1 > majority_f1(y):
            decisions.append("threshold")
        else:
            decisions.append("majority_present" if len(y) and y.mean() >= 0.5 else "majority_absent")
    return thresholds, decisions


def apply_decisions(probs: np.ndarray, thresholds: Sequence[float], decisions: Sequence[str]) -> np.ndarray:
    """Binary predictions (N, n_attributes) from per-attribute thresholds and decisions."""
    pred = probs >= np.asarray(thresholds, dtype=np.float32)
    for j, d in enumerate(decisions):
        if d != "threshold":
            pred[:, j] = d == "majority_present"
    return pred


def initial_decisions(targets: np.ndarray, attributes: list[str]) -> list[str]:
    """Per attribute ``"threshold"``, or the majority rule where the training labels hold only one class.

    A model cannot learn an attribute with no known positives, no known negatives or no known
    labels at all, so its probability means nothing; such an attribute is always reported absent
    (or present, if every known label is 1), with a warning.
    """
    out = []
    for j, a in enumerate(attributes):
        pos, neg = int((targets[:, j] == 1).sum()), int((targets[:, j] == 0).sum())
        if pos and neg:
            out.append("threshold")
            continue
        what = "no known labels (all NA)" if not (pos or neg) else ("no known positives" if not pos else
                                                                     "no known negatives")
        out.append("majority_present" if pos else "majority_absent")
        warnings.warn(f"{a}: {what} among the {len(targets)} training images; it cannot be learned, so it is "
                      f"always reported {'present' if pos else 'absent'}", stacklevel=3)
    return out


def attribute_report(targets: np.ndarray, probs: np.ndarray, attributes: Sequence[str],
                     thresholds: Sequence[float] | None = None, decisions: Sequence[str] | None = None,
                     n_boot: int = 1000, n_perm: int = 200, seed: int = 0) -> pd.DataFrame:
    """Per-attribute metrics with NA excluded, next to the majority baseline and the chance reference.

    Args:
        targets: (N, n_attributes) with -1 for NA.
        probs: (N, n_attributes) predicted probabilities.
        attributes: names.
        thresholds: decision thresholds (default 0.5).
        decisions: per-attribute decision rule (default all ``"threshold"``).
    Returns:
        One row per attribute: n_known, pos_rate, ap, roc_auc with its bootstrap interval, the
        permutation-null AUC range, precision/recall/f1 of the decision rule, majority_f1, verdict.
    """
    n = len(attributes)
    thresholds = list(thresholds) if thresholds is not None else [0.5] * n
    decisions = list(decisions) if decisions is not None else ["threshold"] * n
    pred_all = apply_decisions(probs, thresholds, decisions)
    rows = []
    for j, a in enumerate(attributes):
        m = targets[:, j] >= 0
        y, p, pred = targets[m, j].astype(int), probs[m, j], pred_all[m, j]
        both = _both_classes(y)
        auc = roc_auc_score(y, p) if both else float("nan")
        lo, hi = bootstrap_auc(y, p, n_boot, seed)
        null = permutation_auc(y, p, n_perm, seed)
        pr, rc, f1, _ = precision_recall_fscore_support(y, pred, average="binary", zero_division=0) if len(y) else (np.nan,) * 4
        rows.append({
            "attribute": a, "n_known": int(m.sum()), "pos_rate": float(y.mean()) if len(y) else float("nan"),
            "ap": average_precision_score(y, p) if both else float("nan"),
            "roc_auc": auc, "auc_lo": lo, "auc_hi": hi,
            "chance_auc_lo": null["lo"], "chance_auc_hi": null["hi"], "perm_p": null["p_value"],
            "decision": decisions[j], "threshold": float(thresholds[j]),
            "precision": float(pr), "recall": float(rc), "f1": float(f1),
            "majority_f1": majority_f1(y), "verdict": verdict(auc, lo, hi),
        })
    return pd.DataFrame(rows).set_index("attribute")


def summarize(report: pd.DataFrame) -> dict:
    """Macro means of the main metrics (NaN-skipping)."""
    cols = ["ap", "pos_rate", "roc_auc", "precision", "recall", "f1", "majority_f1"]
    return {f"macro_{c}": float(report[c].mean()) for c in cols}


def report_to_json(report: pd.DataFrame) -> dict:
    """Plain-data form of ``attribute_report`` plus macro means, for ``--json``."""
    per = {a: {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
           for a, row in report.to_dict(orient="index").items()}
    macro = {k: (None if np.isnan(v) else v) for k, v in summarize(report).items()}
    return {"attributes": per, "macro": macro}
