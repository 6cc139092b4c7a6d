"""Label-audit benchmark: ``python -m aimonk.benchmark audit --data DIR [--noise 0.1] [--json FILE]``.

On the folder's own labels it records what the audit says (the signal gate, conflicting duplicates, the
top suspects, for a person to look at). With ``--noise`` it flips that share of the known labels at
random (seeded; the true labels set aside) and measures:

- how well the issue score ranks the flipped cells: AUROC, precision at the top 50 and 100;
- whether cleaning helps: on each cross-validation fold, the training part is audited on its noisy
  labels; a probe on the same frozen features is trained on the noisy labels, with the flagged images
  dropped, and with the flagged labels set to NA (and, as a ceiling, on the true labels); each is scored
  by held-out macro AP against the true labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from aimonk.audit import AUDIT_C, AUDIT_FOLDS, AuditResult, audit, cross_fitted_probabilities, score_labels
from aimonk.benchmark.report import run_info
from aimonk.data import file_digest, index_dataset, make_folds
from aimonk.features import DEFAULT_BACKBONES, frozen_features
from aimonk.files import atomic_write_text
from aimonk.metrics import macro_average_precision
from aimonk.probe import logistic_probabilities

TOP_SHOWN = 30  # suspects of the real labels listed in the record, for a person to look at


def flip_labels(targets: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``targets`` with ``share`` of the known cells flipped at random; returns ``(noisy, flipped mask)``."""
    rng = np.random.default_rng(seed)
    known = np.argwhere(targets >= 0)
    pick = known[rng.choice(len(known), int(round(share * len(known))), replace=False)]
    flipped = np.zeros(targets.shape, bool)
    flipped[pick[:, 0], pick[:, 1]] = True
    return np.where(flipped, 1 - targets, targets), flipped


def ranking_scores(result: AuditResult, flipped: np.ndarray, row_of: dict[str, int]) -> dict:
    """How well the audit ranks the flipped cells among all scored known cells."""
    cells = result.label_scores
    rows = cells["image"].map(row_of).to_numpy()
    cols = cells["attribute"].map({a: j for j, a in enumerate(result.attributes)}).to_numpy()
    truth = flipped[rows, cols]
    order = np.argsort(-cells["score"].to_numpy(), kind="stable")
    flagged = cells["flagged"].to_numpy()
    per_attribute = {a: float(roc_auc_score(truth[cols == j], cells["score"].to_numpy()[cols == j]))
                     for j, a in enumerate(result.attributes) if 0 < truth[cols == j].sum() < (cols == j).sum()}
    return {"n_scored": int(len(cells)), "n_flipped": int(truth.sum()),
            "auroc": float(roc_auc_score(truth, cells["score"])), "auroc_per_attribute": per_attribute,
            "precision_at_50": float(truth[order[:50]].mean()), "precision_at_100": float(truth[order[:100]].mean()),
            "n_flagged": int(flagged.sum()), "flagged_precision": float(truth[flagged].mean()) if flagged.any() else None,
            "flagged_recall": float(flagged[truth].mean())}


def threshold_adjusted_score(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The issue score with confident learning's per-class threshold adjustment (cleanlab's
    ``adjust_pred_probs``): an ablation; the audit uses the plain self-confidence."""
    y = y.astype(int)
    pp = np.stack([1 - p, p], 1)
    t = np.array([pp[y == k, k].mean() for k in (0, 1)])
    adjusted = pp - t + t.max()
    adjusted /= adjusted.sum(1, keepdims=True)
    return 1 - adjusted[np.arange(len(y)), y]


def ablations(feats: np.ndarray, noisy: np.ndarray, flipped: np.ndarray, groups: list[str], seed: int) -> dict:
    """AUROC of the flipped cells for the audit's variants: one cross-fitting round, and with the
    threshold-adjusted score."""
    p1 = cross_fitted_probabilities(feats, noisy, groups, AUDIT_FOLDS, AUDIT_C, seed, rounds=1)
    known = noisy >= 0
    plain = np.where(noisy == 1, 1 - p1, p1)
    adjusted = np.zeros_like(p1)
    for j in range(noisy.shape[1]):
        k = known[:, j]
        adjusted[k, j] = threshold_adjusted_score(noisy[k, j], p1[k, j])
    return {"one round": float(roc_auc_score(flipped[known], plain[known])),
            "one round, threshold-adjusted score": float(roc_auc_score(flipped[known], adjusted[known]))}


def cleaned_labels(noisy: np.ndarray, result: AuditResult, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The training labels per condition: ``(rows kept, labels)`` for noisy, drop-flagged-images, flagged-to-NA."""
    flagged = result.label_scores[result.label_scores["flagged"] & result.label_scores["signal"]]
    row_of = {n: i for i, n in enumerate(names)}
    rows = flagged["image"].map(row_of).to_numpy()
    cols = flagged["attribute"].map({a: j for j, a in enumerate(result.attributes)}).to_numpy()
    as_na = noisy.copy()
    as_na[rows, cols] = -1
    keep = np.setdiff1d(np.arange(len(names)), rows)
    everything = np.arange(len(names))
    return {"noisy": (everything, noisy), "drop flagged images": (keep, noisy[keep]), "flagged labels to NA": (everything, as_na)}


def cleaning_experiment(feats: np.ndarray, truth: np.ndarray, noisy: np.ndarray, groups: list[str], names: list[str],
                        attributes: list[str], folds: int, seed: int) -> list[dict]:
    """One row per (fold, condition): held-out macro AP against the true labels of a probe trained per condition."""
    rows = []
    for k, test in enumerate(make_folds(truth, groups, folds, seed)):
        train = np.setdiff1d(np.arange(len(names)), test)
        tr_names, tr_groups = [names[i] for i in train], [groups[i] for i in train]
        probs = cross_fitted_probabilities(feats[train], noisy[train], tr_groups, AUDIT_FOLDS, AUDIT_C, seed)
        result = score_labels(tr_names, noisy[train], probs, attributes)
        conditions = {**cleaned_labels(noisy[train], result, tr_names), "true labels (ceiling)": (
            np.arange(len(train)), truth[train])}
        for condition, (keep, labels) in conditions.items():
            p_test = logistic_probabilities(feats[train][keep], labels, AUDIT_C, [feats[test]])[0]
            rows.append({"fold": k, "labels": condition, "n_train_images": int(len(keep)),
                         "n_changed": int((labels != noisy[train][keep]).sum()),
                         "macro_ap": macro_average_precision(truth[test], p_test)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def real_label_section(result: AuditResult) -> dict:
    """What the audit says about the folder's own labels."""
    top = result.suspects(TOP_SHOWN)
    return {"n_images": len(result.names), "n_known": int((result.targets >= 0).sum()),
            "signal": {a: {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
                       for a, row in result.signal.to_dict(orient="index").items()},
            "duplicates": result.duplicates,
            "top_suspects": json.loads(top.to_json(orient="records"))}


REVIEW_VERDICTS = {"flip": "real tagging error", "na": "ambiguous", "drop": "real tagging error", "keep": "label right"}


def manual_review(top_suspects: list[dict], log_path: str) -> dict:
    """Count a person's verdicts on the top suspects from a review log (``review.LabelReview``): flip or
    drop = the label was wrong, na = ambiguous, keep = the label was right. Suspects without a decision are
    counted as not reviewed."""
    decided = {}
    for line in open(log_path, encoding="utf-8"):
        if line.strip():
            e = json.loads(line)
            decided[(e["image"], e["attribute"])] = e["action"]
    verdicts = [REVIEW_VERDICTS.get(decided.get((t["image"], t["attribute"])), "not reviewed") for t in top_suspects]
    return {"log": log_path, "suspects": len(top_suspects),
            **{v: verdicts.count(v) for v in ["real tagging error", "ambiguous", "label right", "not reviewed"]}}


def run(data_dir: str, noise: float, seed: int, folds: int) -> dict:
    """The benchmark record (without the run description)."""
    real = audit(data_dir, seed=seed)
    record = {"benchmark": "audit", "data": data_dir, "noise": noise, "seed": seed, "settings": real.settings,
              "real": real_label_section(real)}
    if noise > 0:
        index = index_dataset(data_dir, warn=False)
        digests = [file_digest(p) for p in index.paths]
        feats, ok = frozen_features(index.paths, DEFAULT_BACKBONES, real.settings["image_size"], digests, progress=False)
        names, truth, groups = [index.table.names[i] for i in ok], index.table.targets[ok], [digests[i] for i in ok]
        noisy, flipped = flip_labels(truth, noise, seed)
        probs = cross_fitted_probabilities(feats, noisy, groups, AUDIT_FOLDS, AUDIT_C, seed)
        synthetic = score_labels(names, noisy, probs, index.attributes)
        record["synthetic"] = {**ranking_scores(synthetic, flipped, {n: i for i, n in enumerate(names)}),
                               "audited": synthetic.audited,
                               "ablations_auroc": ablations(feats, noisy, flipped, groups, seed)}
        print(json.dumps(record["synthetic"]), flush=True)
        record["cleaning"] = {"folds": folds,
                              "rows": cleaning_experiment(feats, truth, noisy, groups, names, index.attributes, folds, seed)}
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aimonk.benchmark audit", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with labels.txt and images/")
    p.add_argument("--noise", type=float, default=0.1, help="share of known labels flipped at random (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the flips and the folds")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds of the cleaning experiment")
    p.add_argument("--review-log", default=None,
                   help="a review_log.jsonl with a person's decisions on the top suspects of the real labels "
                        "(flip/drop = wrong label, na = ambiguous, keep = right); counted into the record")
    p.add_argument("--json", default=None, help="write the record to this JSON file")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    start, info = time.perf_counter(), run_info("audit", argv)
    record = run(a.data, a.noise, a.seed, a.folds)
    if a.review_log:
        record["real"]["manual_review"] = manual_review(record["real"]["top_suspects"], a.review_log)
    info["wall_minutes"] = round((time.perf_counter() - start) / 60, 1)
    record["run"] = info
    if "synthetic" in record:
        s = record["synthetic"]
        print(f"\nflipped {s['n_flipped']} of {s['n_scored']} known labels: AUROC {s['auroc']:.3f}, "
              f"precision@50 {s['precision_at_50']:.2f}, precision@100 {s['precision_at_100']:.2f}")
    if a.json:
        atomic_write_text(a.json, json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
