"""Label audit: which known labels the images dispute, per (image, attribute), with NA left out.

1. Every labelled image gets out-of-sample probabilities: a logistic-regression probe on cached frozen
   ImageNet features (``features.frozen_features``), cross-fitted over folds grouped by image content
   and stratified by label, so no image is scored by a probe that saw it. Each fold's probe is fitted
   without the labels its training part disputes (found by cross-fitting inside that part).
2. Per attribute, on its known labels only, confident learning (Northcutt, Jiang & Chuang, "Confident
   Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021) treats the attribute as a binary
   task: the per-class thresholds are the mean self-confidence of each given label; a label is
   *flagged* when the other class is confidently predicted (the off-diagonal of the confident joint);
   its *score* is one minus the self-confidence (Kuan & Mueller, "Model-agnostic label quality scoring
   to detect real-world label errors", 2022), higher meaning more likely wrong.
3. Copies of one image (byte-identical, or within a few bits of perceptual hash) whose known labels
   disagree are certain issues: one of the copies is wrong.
4. The signal gate: an attribute is audited only where the out-of-sample AUC's 95 % bootstrap interval
   lies above 0.5. Elsewhere the model has no signal, so it cannot tell wrong labels from right ones;
   its cells are still scored, and marked so, but never ranked as suspects.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import imagehash
import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import roc_auc_score

from aimonk.cache import DecodedCache
from aimonk.data import file_digest, index_dataset, make_folds
from aimonk.evaluate import score_folder
from aimonk.explore import label_token
from aimonk.features import DEFAULT_BACKBONES, frozen_features
from aimonk.metrics import bootstrap_auc, has_signal, verdict
from aimonk.probe import PROBE_C_DEFAULT, logistic_probabilities
from aimonk.progress import tqdm
from aimonk.train import recipe_config, train

AUDIT_FOLDS = 5  # cross-fitting folds: each image is scored by a probe fitted on the other 4/5
AUDIT_C = PROBE_C_DEFAULT  # fixed, not tuned on the audited labels, so the signal gate stays honest
AUDIT_ROUNDS = 2  # the second round refits each fold's probe without the labels its training part disputes
NEAR_DUPLICATE_BITS = 4  # perceptual hashes (64 bits) this close mark near-identical images
# The score of a cell whose copies disagree, above every model score (<= 1): byte-identical copies are
# certain issues; perceptual-hash copies nearly so, but can be one photo template with different prints.
DUPLICATE_SCORE = {"identical": 2.0, "near-identical": 1.5}


@dataclass
class AuditResult:
    """What ``audit`` found. ``label_scores`` has one row per known (image, attribute) cell."""

    attributes: list[str]
    names: list[str]  # the scored images, in labels-file order
    targets: np.ndarray  # (N, A): 1, 0, -1 (NA)
    probabilities: np.ndarray  # (N, A) out-of-sample probe probabilities
    signal: pd.DataFrame  # per attribute: the gate, AUC and interval, confident-learning counts
    label_scores: pd.DataFrame  # image, attribute, label, probability, score, flagged, signal, duplicate, copies
    duplicates: list[dict]  # conflicting groups: kind, images, labels, conflicting attributes
    settings: dict = field(default_factory=dict)  # data, labels file, backbones, folds, C, seed

    @property
    def audited(self) -> list[str]:
        """The attributes that pass the signal gate."""
        return [a for a in self.attributes if self.signal.loc[a, "signal"]]

    def suspects(self, top: int | None = None) -> pd.DataFrame:
        """Cells to review, most likely wrong first: conflicting duplicates, then flagged cells of
        audited attributes, then their other cells by score. Cells of attributes without signal are left out."""
        s = self.label_scores
        s = s[s["duplicate"] | s["signal"]]
        s = s.sort_values(["duplicate", "flagged", "score"], ascending=False, kind="stable")
        return (s if top is None else s.head(top)).reset_index(drop=True)

    def to_json(self, top: int | None = None) -> dict:
        """A plain object other tools can rely on (see ``docs/audit.md``)."""
        cells = self.label_scores
        return {
            "attributes": list(self.attributes),
            "settings": self.settings,
            "signal": {a: _plain(row) for a, row in self.signal.to_dict(orient="index").items()},
            "duplicates": self.duplicates,
            "label_scores": [_plain(r) for r in cells.to_dict(orient="records")],
            "suspects": [_plain(r) for r in self.suspects(top).to_dict(orient="records")],
        }

    def summary(self) -> str:
        """A few plain sentences: what was audited, what has no signal, how many issues."""
        lines = []
        for a, row in self.signal.iterrows():
            if row["signal"]:
                lines.append(f"{a}: audited ({row['verdict']}); {row['n_flagged']} of {row['n_known']} known "
                             f"labels flagged by confident learning")
            else:
                lines.append(f"{a}: not audited, {row['verdict']}: the model cannot tell wrong labels from "
                             f"right ones here, so its {row['n_known']} labels are not ranked")
        if not self.audited:
            lines.append("No attribute shows signal: only conflicting duplicates are certain issues.")
        lines.append(f"{len(self.duplicates)} duplicate group(s) with conflicting labels.")
        return "\n".join(lines)


def _plain(row: dict) -> dict:
    """JSON-ready values: numpy scalars as Python ones, NaN as None."""
    out = {}
    for k, v in row.items():
        v = v.item() if isinstance(v, np.generic) else v
        out[k] = None if isinstance(v, float) and np.isnan(v) else v
    return out


def audit(data_dir: str | os.PathLike, labels: str | os.PathLike | None = None,
          backbones: Sequence[str] = DEFAULT_BACKBONES, image_size: int = 224, n_folds: int = AUDIT_FOLDS,
          C: float = AUDIT_C, seed: int = 0, near_bits: int = NEAR_DUPLICATE_BITS,
          cache_dir: str | os.PathLike | None = None, progress: bool = True, method: str = "probe",
          recipe: str = "pretrained", train_overrides: dict | None = None) -> AuditResult:
    """Audit the known labels of a data folder.

    Args:
        data_dir: folder with ``labels.txt`` and ``images/``.
        labels: labels file to audit instead of ``data_dir/labels.txt`` (e.g. an earlier review's output).
        backbones: frozen networks whose concatenated features the probe reads.
        image_size: input size of the networks.
        n_folds: cross-fitting folds.
        C: the probe's inverse L2 strength (on standardised features).
        seed: fold seed.
        near_bits: perceptual-hash distance (bits of 64) within which images count as near-identical.
        cache_dir: cache root for decoded images and features.
        progress: show progress bars.
        method: ``"probe"`` (the default: seconds per fold once the features are cached) or ``"finetune"``
            (one training of ``recipe`` per fold: the slow option).
        recipe: the training recipe of ``method="finetune"``, with ``train_overrides`` on top.
    Returns:
        An ``AuditResult``.
    """
    if method not in ("probe", "finetune"):
        raise ValueError(f"method must be 'probe' or 'finetune', got {method!r}")
    index = index_dataset(data_dir, labels_file=labels)
    digests = [file_digest(p) for p in index.paths]
    images = DecodedCache(index.paths, image_size, cache_dir, digests=digests, progress=progress)
    ok = images.ok
    names, targets, groups = [index.table.names[i] for i in ok], index.table.targets[ok], [digests[i] for i in ok]
    if method == "probe":
        feats, _ = frozen_features([index.paths[i] for i in ok], backbones, image_size, groups, cache_dir,
                                   progress=progress)
        probs = cross_fitted_probabilities(feats, targets, groups, n_folds, C, seed, progress=progress)
    else:
        probs = finetuned_probabilities(data_dir, index.table.source, names, targets, groups, n_folds, seed, recipe,
                                        train_overrides, progress)
    dup_groups = duplicate_groups(groups, perceptual_hashes(torch.utils.data.Subset(images, ok)), near_bits)
    settings = {"data": str(data_dir), "labels": str(index.table.source), "labels_sha256": file_digest(index.table.source),
                "method": method, "backbones": list(backbones) if method == "probe" else [],
                "recipe": recipe if method == "finetune" else None, "image_size": image_size, "folds": n_folds,
                "C": C, "seed": seed, "near_duplicate_bits": near_bits}
    return score_labels(names, targets, probs, index.attributes, dup_groups, settings)


def finetuned_probabilities(data_dir: str | os.PathLike, labels: str | os.PathLike, names: Sequence[str],
                            targets: np.ndarray, groups: Sequence[str], n_folds: int, seed: int = 0,
                            recipe: str = "pretrained", overrides: dict | None = None,
                            progress: bool = True) -> np.ndarray:
    """Out-of-sample probabilities (N, A) from fine-tuned networks: per fold (grouped, stratified), ``recipe``
    is trained on the other folds (with its own validation split) and scores the fold. The slow option:
    ``n_folds`` trainings."""
    probs = np.full(targets.shape, 0.5, np.float32)
    row = {n: i for i, n in enumerate(names)}
    with tempfile.TemporaryDirectory(prefix="aimonk-audit-") as work:
        for k, held in enumerate(make_folds(targets, groups, n_folds, seed)):
            rest = np.setdiff1d(np.arange(len(names)), held)
            cfg = recipe_config(recipe, **{**(overrides or {}), "data_dir": str(data_dir), "labels": str(labels),
                                           "out": os.path.join(work, f"fold{k}.pth"), "loss_plot": "", "seed": seed,
                                           "progress": progress})
            result = train(cfg, names=[names[i] for i in rest])
            # torch: an ONNX runtime loaded here would share the process with the next fold's DataLoader workers
            _, p, scored, _ = score_folder(result.checkpoint, data_dir, names=[names[i] for i in held], labels=labels,
                                           runtime="torch")
            probs[[row[n] for n in scored]] = p
    return probs


def cross_fitted_probabilities(feats: np.ndarray, targets: np.ndarray, groups: Sequence[str], n_folds: int = AUDIT_FOLDS,
                               C: float = AUDIT_C, seed: int = 0, rounds: int = AUDIT_ROUNDS,
                               progress: bool = False) -> np.ndarray:
    """Out-of-sample probabilities (N, A): each fold (grouped by ``groups``, stratified) scored by a probe
    fitted on the other folds; NA labels are left out of each attribute's fit.

    With ``rounds=2`` the probe of each fold is fitted without the training labels that its own training
    images dispute: those labels are found by the same cross-fitting run inside the training folds only
    (so the held-out fold never influences what is left out), and set to NA for the fit.
    """
    probs = np.full(targets.shape, 0.5, np.float32)
    for held in tqdm(make_folds(targets, groups, n_folds, seed), desc="cross-fitting probes", disable=not progress):
        rest = np.setdiff1d(np.arange(len(targets)), held)
        fit_targets = targets[rest]
        if rounds > 1:
            inner = cross_fitted_probabilities(feats[rest], fit_targets, [groups[i] for i in rest],
                                               max(2, n_folds - 1), C, seed, rounds - 1)
            fit_targets = np.where(disputed(fit_targets, inner), -1, fit_targets)
        probs[held] = logistic_probabilities(feats[rest], fit_targets, C, [feats[held]])[0]
    return probs


def disputed(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Known labels whose out-of-sample probability favours the other class (p(given label) < 0.5), (N, A)."""
    return (targets >= 0) & (np.where(targets == 1, probs, 1 - probs) < 0.5)


def confident_learning(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Confident learning for one binary attribute on its known labels.

    Args:
        y: given labels, 0 or 1, (n,).
        p: out-of-sample probability of 1, (n,).
    Returns:
        ``(score, flagged, (t0, t1))``: per label the issue score in [0, 1] (higher = more likely wrong),
        whether the other class is confidently predicted, and the per-class thresholds.

    The score is one minus the self-confidence, ``1 - p(given label)``, without the per-class threshold
    adjustment: the probe is fitted with balanced class weights, so its probabilities hold no class prior
    to correct for (on clipart with 10 % flips the adjustment lowered the AUROC; docs/audit.md).
    """
    y = y.astype(int)
    pp = np.stack([1 - p, p], 1).astype(np.float64)  # (n, 2): probability of each class
    t = np.array([pp[y == k, k].mean() if (y == k).any() else 1.0 for k in (0, 1)])  # mean self-confidence
    rows, other = np.arange(len(y)), 1 - y
    score = 1 - pp[rows, y]
    confident = pp >= t  # (n, 2): classes predicted at or above their threshold
    # The confident joint counts a label under the most probable confident class; off its diagonal it is
    # flagged: the other class is confident, and more probable than the given one if both are.
    flagged = confident[rows, other] & (~confident[rows, y] | (pp[rows, other] > pp[rows, y]))
    return score, flagged, (float(t[0]), float(t[1]))


def score_labels(names: Sequence[str], targets: np.ndarray, probs: np.ndarray, attributes: Sequence[str],
                 dup_groups: Sequence[tuple[str, list[int]]] = (), settings: dict | None = None,
                 n_boot: int = 1000, seed: int = 0) -> AuditResult:
    """Score every known cell, gate each attribute on signal, and list conflicting duplicates.

    Args:
        names: image names, (N,).
        targets: (N, A) with -1 for NA.
        probs: (N, A) out-of-sample probabilities.
        attributes: names, (A,).
        dup_groups: ``(kind, rows)`` of each group of identical or near-identical images (``duplicate_groups``).
        settings: recorded in the result.
    """
    conflicts = conflicting_duplicates(names, targets, attributes, dup_groups)
    in_conflict = {(names[i], a): g["kind"] for g in conflicts for i in g["rows"] for a in g["conflicting"]
                   if targets[i, list(attributes).index(a)] >= 0}
    signal_rows, cells = {}, []
    for j, a in enumerate(attributes):
        known = np.flatnonzero(targets[:, j] >= 0)
        y, p = targets[known, j].astype(int), probs[known, j]
        row = _signal_row(y, p, n_boot, seed)
        score, flagged = (confident_learning(y, p)[:2] if 0 < y.sum() < len(y)
                          else (np.full(len(y), np.nan), np.zeros(len(y), bool)))
        flagged &= row["signal"]  # without signal a "confident" prediction means nothing: nothing is flagged
        row["n_flagged"] = int(flagged.sum())
        signal_rows[a] = row
        for i, yi, pi, si, fi in zip(known, y, p, score, flagged):
            copies = in_conflict.get((names[i], a), "")
            cells.append({"image": names[i], "attribute": a, "label": int(yi), "probability": float(pi),
                          "score": DUPLICATE_SCORE[copies] if copies else float(si), "model_score": float(si),
                          "flagged": bool(fi) or bool(copies), "signal": row["signal"], "duplicate": bool(copies),
                          "copies": copies})
    for g in conflicts:
        del g["rows"]
    return AuditResult(list(attributes), list(names), targets, probs,
                       pd.DataFrame.from_dict(signal_rows, orient="index"), pd.DataFrame(cells, columns=_CELL_COLUMNS),
                       conflicts, settings or {})


_CELL_COLUMNS = ["image", "attribute", "label", "probability", "score", "model_score", "flagged", "signal", "duplicate",
                 "copies"]


def _signal_row(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict:
    """The gate for one attribute: AUC with its 95 % bootstrap interval, and the verdict."""
    both = 0 < y.sum() < len(y)
    auc = float(roc_auc_score(y, p)) if both else float("nan")
    lo, hi = bootstrap_auc(y, p, n_boot, seed)
    return {"n_known": int(len(y)), "n_positive": int(y.sum()), "auc": auc, "auc_lo": lo, "auc_hi": hi,
            "signal": bool(both and has_signal(lo)), "verdict": verdict(auc, lo, hi)}


def conflicting_duplicates(names: Sequence[str], targets: np.ndarray, attributes: Sequence[str],
                           dup_groups: Sequence[tuple[str, list[int]]]) -> list[dict]:
    """The groups whose copies disagree on a known label (an NA next to a known label is no conflict).

    Returns:
        One dict per conflicting group: ``kind``, ``images``, ``labels`` (image -> tokens),
        ``conflicting`` (attribute names) and ``rows`` (indices, for the caller).
    """
    out = []
    for kind, g in dup_groups:
        t = targets[list(g)]
        bad = [a for j, a in enumerate(attributes) if len(set(t[t[:, j] >= 0, j].tolist())) > 1]
        if bad:
            out.append({"kind": kind, "images": [names[i] for i in g],
                        "labels": {names[i]: [label_token(v) for v in targets[i]] for i in g},
                        "conflicting": bad, "rows": list(g)})
    return out


def perceptual_hashes(images) -> np.ndarray:
    """The 64-bit DCT perceptual hash (``imagehash.phash``) of each decoded uint8 (3, S, S) image, as uint64 (N,)."""
    hashes = np.zeros(len(images), np.uint64)
    for i in range(len(images)):
        h = imagehash.phash(Image.fromarray(np.asarray(images[i]).transpose(1, 2, 0)))
        hashes[i] = np.uint64(int(str(h), 16))
    return hashes


def duplicate_groups(digests: Sequence[str], hashes: np.ndarray, near_bits: int = NEAR_DUPLICATE_BITS,
                     chunk: int = 1024) -> list[tuple[str, list[int]]]:
    """Groups of two or more images that are byte-identical or whose perceptual hashes differ in at
    most ``near_bits`` bits (connected components, so near-identity is taken transitively).

    Returns:
        ``(kind, rows)`` per group; kind ``"identical"`` (one file content) or ``"near-identical"``.
    """
    n = len(digests)
    rows, cols = [], []
    for start in range(0, n, chunk):  # pairwise Hamming distances, a block of rows at a time
        d = np.bitwise_count(hashes[start:start + chunk, None] ^ hashes[None, :])  # (chunk, n)
        r, c = np.nonzero(d <= near_bits)
        rows.append(r + start)
        cols.append(c)
    by_digest: dict[str, int] = {}
    for i, dg in enumerate(digests):  # identical bytes always group, whatever the hash says
        rows.append(np.array([i]))
        cols.append(np.array([by_digest.setdefault(dg, i)]))
    r, c = np.concatenate(rows), np.concatenate(cols)
    _, label = connected_components(coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n)), directed=False)
    groups = []
    for k in np.unique(label):
        members = np.flatnonzero(label == k).tolist()
        if len(members) > 1:
            kind = "identical" if len({digests[i] for i in members}) == 1 else "near-identical"
            groups.append((kind, members))
    return groups
