"""Frozen-feature probes: per-attribute logistic regressions on a frozen pretrained network's features.

They serve twice: as the head initialisation of LP-FT (``linear_probe_head``), and as the probe that
the ``pretrained`` recipe averages with the fine-tuned network (``fit_probe``, a ``ProbeEnsemble``).
Validation scores always come from probes that did not see the image scored.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import nn
from torchvision.transforms import v2

from aimonk import config
from aimonk.cache import DecodedCache
from aimonk.data import ImageDataset
from aimonk.features import cached_features
from aimonk.inference import infer_probabilities
from aimonk.metrics import macro_average_precision
from aimonk.model import BACKBONES, ProbeEnsemble, WeightsUnavailableError, feature_probe, head_module, is_random_init


@torch.inference_mode()
def linear_probe_head(model: nn.Module, dataset: ImageDataset, device: torch.device, precision: str = "fp32",
                      channels_last: bool = False, mean=config.IMAGENET_MEAN, std=config.IMAGENET_STD,
                      C: float = 0.5) -> None:
    """Set the head to per-attribute logistic regressions fitted on the frozen backbone's features.

    The first half of LP-FT (Kumar et al., "Fine-Tuning can Distort Pretrained Features", ICLR 2022):
    fine-tuning then starts from a head that already fits, so early gradients do not scramble the
    pretrained features. Features are the head's inputs in eval mode, without augmentation; NA
    labels are left out of each attribute's fit; classes are balanced like ``pos_weight``. An
    attribute with a single known class keeps its random head row.
    """
    feats = head_inputs(model, dataset, device, precision, channels_last, mean, std)
    fit_logistic_head(head_module(model), feats, dataset.targets.numpy(), C)



def head_inputs(model: nn.Module, dataset: ImageDataset, device: torch.device, precision: str = "fp32",
                channels_last: bool = False, mean=config.IMAGENET_MEAN, std=config.IMAGENET_STD) -> np.ndarray:
    """The features the head sees, (N, D), for every image of ``dataset`` in eval mode, without augmentation."""
    captured = []  # the head's inputs, batch by batch, recorded while the usual inference loop runs
    hook = head_module(model).register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0].float().cpu()))
    try:
        infer_probabilities(model, dataset, device, precision, channels_last, mean, std)
    finally:
        hook.remove()
    return torch.cat(captured).numpy()



@torch.no_grad()
def fit_logistic_head(head: nn.Linear, feats: np.ndarray, targets: np.ndarray, C: float,
                      shift: np.ndarray | None = None, scale: np.ndarray | None = None) -> None:
    """Set each attribute's row of ``head`` to a class-balanced logistic regression on ``feats``.

    NA labels (-1) are left out of each attribute's fit; an attribute with a single known class
    keeps its row. With ``shift``/``scale`` the regression sees standardised features
    ``(feats - shift) / scale`` and the head gets the equivalent weights on the raw features.
    """
    shift = np.zeros(feats.shape[1]) if shift is None else shift
    scale = np.ones(feats.shape[1]) if scale is None else scale
    for j, (coef, intercept) in enumerate(logistic_fits((feats - shift) / scale, targets, [C])[C]):
        if coef is not None:
            w = coef / scale
            head.weight[j] = torch.from_numpy(w).to(head.weight)
            head.bias[j] = float(intercept - w @ shift)


def logistic_fits(z: np.ndarray, targets: np.ndarray, Cs: Sequence[float]) -> dict[float, list[tuple]]:
    """Class-balanced L2 logistic regressions (sklearn, lbfgs) of every attribute on ``z``, for each C of ``Cs``.

    With fewer rows than features (the probe's ~800 images and 2,560 features) the fits run on
    ``z``'s row space (``z = U S Vt``, weights ``Vt.T @ a``): the L2-penalised optimum lies in the span
    of the rows it is fitted on, so the solution is the same, with one column per row instead of one
    per feature. The Cs run in increasing order, each fit starting from the previous one's solution.
    numpy's BLAS runs on one thread here: beside torch's threads, two were 3x slower (docs/speed.md).

    Returns:
        ``{C: [(coef (D,), intercept) per attribute]}``, ``(None, None)`` for an attribute without both
        known classes (NA labels, -1, are left out of each fit).
    """
    with threadpool_limits(1, user_api="blas"):  # 3x faster: numpy's BLAS threads contend with torch's
        return _logistic_fits(z, targets, Cs)


def _logistic_fits(z: np.ndarray, targets: np.ndarray, Cs: Sequence[float]) -> dict[float, list[tuple]]:
    basis = None
    if z.shape[0] < z.shape[1]:
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        basis = vt[s > s[0] * 1e-10].T if len(s) and s[0] > 0 else vt.T  # (D, rank)
        z = z @ basis
    fits = {C: [(None, None)] * targets.shape[1] for C in Cs}
    for j in range(targets.shape[1]):
        known = targets[:, j] >= 0
        y = targets[known, j].astype(int)
        if not 0 < y.sum() < len(y):
            continue
        clf = LogisticRegression(max_iter=2000, class_weight="balanced", warm_start=True)
        for C in sorted(Cs):
            clf.set_params(C=C).fit(z[known], y)
            coef = clf.coef_[0] if basis is None else basis @ clf.coef_[0]
            fits[C][j] = (coef, float(clf.intercept_[0]))
    return fits


PROBE_C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
"""Inverse L2 strengths tried for the probe on standardised features; validation picks one."""



PROBE_C_DEFAULT = 0.01  # the probe's C when there is no validation split



PROBE_CROSS_FIT_FOLDS = 5  # validation folds for the out-of-fold probe scores of probe_cross_fit



def logistic_probabilities(feats: np.ndarray, targets: np.ndarray, C: float,
                           predict_on: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Fit ``fit_logistic_head`` on standardised ``feats`` and return its probabilities on each of ``predict_on``.

    An attribute with a single known class gets probability 0.5 everywhere.
    """
    return logistic_probabilities_by_C(feats, targets, [C], predict_on)[C]


def logistic_probabilities_by_C(feats: np.ndarray, targets: np.ndarray, Cs: Sequence[float],
                                predict_on: Sequence[np.ndarray]) -> dict[float, list[np.ndarray]]:
    """``logistic_probabilities`` for each C of ``Cs``, sharing one standardisation and row space."""
    shift, scale = feats.mean(0), feats.std(0) + 1e-6
    views = [(f - shift) / scale for f in predict_on]
    out = {}
    for C, rows in logistic_fits((feats - shift) / scale, targets, Cs).items():
        w = np.stack([np.zeros(feats.shape[1]) if c is None else c for c, _ in rows], 1)  # (D, A)
        b = np.array([0.0 if i is None else i for _, i in rows])  # (A,)
        out[C] = [expit(v @ w + b).astype(np.float32) for v in views]
    return out



def out_of_fold_probabilities(base_feats: np.ndarray, base_targets: np.ndarray, views: Sequence[np.ndarray],
                              targets: np.ndarray, groups: Sequence[str], C: float,
                              n_folds: int = PROBE_CROSS_FIT_FOLDS, seed: int = 0) -> list[np.ndarray]:
    """Probe probabilities for every row of ``views`` from probes that never saw that row's image.

    The rows (``views[0]`` holds their features, further views e.g. of the flipped images) are split
    into ``n_folds`` folds by ``groups`` (content hashes: identical images share a fold). Each fold is
    scored by a probe fitted on ``base_feats`` plus the rows of the other folds.

    Returns:
        One (N, A) array per view.
    """
    return out_of_fold_probabilities_by_C(base_feats, base_targets, views, targets, groups, [C], n_folds, seed)[C]


def out_of_fold_probabilities_by_C(base_feats: np.ndarray, base_targets: np.ndarray, views: Sequence[np.ndarray],
                                   targets: np.ndarray, groups: Sequence[str], Cs: Sequence[float],
                                   n_folds: int = PROBE_CROSS_FIT_FOLDS, seed: int = 0) -> dict[float, list[np.ndarray]]:
    """``out_of_fold_probabilities`` for each C of ``Cs`` (the same folds; each fold's fits share its row space)."""
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[g]: i % n_folds for i, g in enumerate(order)}
    fold = np.array([fold_of[g] for g in groups])
    out = {C: [np.zeros((len(targets), base_targets.shape[1]), np.float32) for _ in views] for C in Cs}
    for k in np.unique(fold):
        held, rest = fold == k, fold != k
        by_C = logistic_probabilities_by_C(np.concatenate([base_feats, views[0][rest]]),
                                           np.concatenate([base_targets, targets[rest]]), Cs, [v[held] for v in views])
        for C, probs in by_C.items():
            for o, p in zip(out[C], probs):
                o[held] = p
    return out


def ensemble_probabilities(finetuned: Sequence[np.ndarray], probe: Sequence[np.ndarray]) -> np.ndarray:
    """What ``ProbeEnsemble`` outputs, from each member's probabilities per view (plain, then flipped):
    the mean of the two members per view, and with two views the flip TTA of ``infer_probabilities``
    (the sigmoid of the mean logit)."""
    logits = [torch.logit((torch.from_numpy(f) + torch.from_numpy(p)) / 2, eps=1e-6) for f, p in zip(finetuned, probe)]
    return torch.sigmoid(torch.stack(logits).mean(0)).numpy()



def probe_backbone_list(backbone: str, probe_backbones: str = "") -> list[str]:
    """The backbones named in ``probe_backbones`` (comma-separated; default ``backbone``); unknown names are refused."""
    backbones = [b.strip() for b in probe_backbones.split(",") if b.strip()] or [backbone]
    unknown = [b for b in backbones if b not in BACKBONES]
    if unknown:
        raise ValueError(f"unknown probe_backbones {unknown}; choose from {sorted(BACKBONES)}")
    return backbones


def frozen_probe(backbone: str, probe_backbones: str, weights: str,
                 n_attributes: int) -> tuple[nn.Module, list[str]] | tuple[None, None]:
    """The frozen pretrained network(s) of the probe and their names, or ``(None, None)`` (with a warning)
    when there are no weights.

    Falls back to the fine-tuned ``backbone`` alone, with a warning, when the named probe backbones
    normalise their inputs differently from it or lack their weights.
    """
    skip = "probe_ensemble skipped: it needs pretrained weights"
    if is_random_init(weights):
        warnings.warn(f"{skip}, and weights={weights!r}", stacklevel=3)
        return None, None
    backbones = probe_backbone_list(backbone, probe_backbones)
    spec = BACKBONES[backbone]
    odd = [b for b in backbones if (BACKBONES[b].mean, BACKBONES[b].std) != (spec.mean, spec.std)]
    if odd:  # the ensemble feeds both members the fine-tuned backbone's normalisation
        warnings.warn(f"the probe reads {backbone} only: probe_backbones {odd} normalise their inputs "
                      f"differently from backbone {backbone!r}", stacklevel=3)
        backbones = [backbone]
    try:
        return feature_probe(backbones, n_attributes, weights), backbones
    except WeightsUnavailableError as e:
        if backbones == [backbone]:
            warnings.warn(f"{skip} ({e})", stacklevel=3)
            return None, None
        warnings.warn(f"the probe reads {backbone} only: {e}", stacklevel=3)  # the fine-tuned one has weights
        return frozen_probe(backbone, backbone, weights, n_attributes)


@dataclass
class ProbeFit:
    """What ``fit_probe`` found on validation (all None/empty without validation images)."""

    C: float = PROBE_C_DEFAULT  # the chosen inverse L2 strength
    val_macro_ap_finetuned: float | None = None  # the fine-tuned network alone
    val_macro_ap: float | None = None  # the ensemble (out of fold when cross-fitted)
    scores: dict | None = None  # out-of-fold ensemble probabilities {"plain", "flip_tta"} when cross-fitted


def choose_probe_C(features: Callable[[ImageDataset, bool], np.ndarray], finetuned: nn.Module,
                   train_feats: np.ndarray, train_targets: np.ndarray, val_set: ImageDataset,
                   val_groups: Sequence[str] | None, cross_fit: bool, tta: bool, seed: int,
                   args: tuple) -> tuple[ProbeFit, np.ndarray]:
    """Pick C on validation: the ``PROBE_C_GRID`` value that gives the averaged model the best macro AP.

    With ``cross_fit`` each validation image is scored by a probe that did not see it
    (``out_of_fold_probabilities``), and those out-of-fold scores are returned for the checkpoint.
    ``features(dataset, flip)`` gives the probe's head inputs for a dataset, mirrored or not.

    Returns:
        ``(fit, val_feats)``: the choice, and the validation features (plain view) for refitting.
    """
    val_y = val_set.targets.numpy()
    views = [val_set, mirrored(val_set)] if tta else [val_set]  # the saved model's flip TTA, view by view
    val_feats = [features(val_set, flip) for flip in (False, True)[:len(views)]]
    p_ft = [infer_probabilities(finetuned, v, *args) for v in views]
    alone = infer_probabilities(finetuned, val_set, *args, tta=True) if tta else p_ft[0]  # TTA averages logits
    fit = ProbeFit(val_macro_ap_finetuned=macro_average_precision(val_y, alone))
    if cross_fit:
        groups = list(val_groups) if val_groups is not None else [str(i) for i in range(len(val_y))]
        p_probe = out_of_fold_probabilities_by_C(train_feats, train_targets, val_feats, val_y, groups, PROBE_C_GRID,
                                                 seed=seed)
    else:
        p_probe = logistic_probabilities_by_C(train_feats, train_targets, PROBE_C_GRID, val_feats)
    val_ap = {C: macro_average_precision(val_y, ensemble_probabilities(p_ft, p)) for C, p in p_probe.items()}
    fit.C = max(val_ap, key=val_ap.get)
    fit.val_macro_ap = val_ap[fit.C]
    if cross_fit:
        best = p_probe[fit.C]
        fit.scores = {"plain": ensemble_probabilities(p_ft[:1], best[:1]),
                      "flip_tta": ensemble_probabilities(p_ft, best) if tta else None}
    return fit, val_feats[0]


def mirrored(dataset: ImageDataset) -> ImageDataset:
    """``dataset`` with every image flipped left to right (the second view of flip TTA)."""
    return ImageDataset(dataset.images, dataset.targets.numpy(), v2.RandomHorizontalFlip(p=1.0))


def cache_view(dataset: ImageDataset) -> tuple[DecodedCache, list[int]] | None:
    """The ``DecodedCache`` and its rows that ``dataset`` shows unchanged, or None (another source, or a transform)."""
    images = dataset.images
    if dataset.transform is not None:
        return None
    if isinstance(images, torch.utils.data.Subset) and isinstance(images.dataset, DecodedCache):
        return images.dataset, list(images.indices)
    return (images, list(range(len(images)))) if isinstance(images, DecodedCache) else None


def fit_probe(finetuned: nn.Module, train_set: ImageDataset, val_set: ImageDataset, *, backbone: str,
              weights: str, probe_backbones: str = "", cross_fit: bool = False, tta: bool = False, seed: int = 0,
              device: torch.device = torch.device("cpu"), precision: str = "fp32", channels_last: bool = False,
              val_groups: Sequence[str] | None = None,
              feature_cache: bool = True) -> tuple[nn.Module, dict | None, dict | None]:
    """Average ``finetuned`` with a logistic-regression probe on frozen pretrained networks.

    The probe (``model.FeatureProbe``) reads the concatenated features of ``probe_backbones``
    (default: ``backbone``); its head is fitted by ``fit_logistic_head`` on standardised features,
    without augmentation, with the C that ``choose_probe_C`` picks on validation. With ``feature_cache``
    and fp32, the frozen features of images that are views of a ``DecodedCache`` are read from (and
    added to) the on-disk feature cache beside it (``features.cached_features``). With ``cross_fit``
    the saved probe is then refitted on training + validation images, and the out-of-fold validation
    scores are returned, because the saved model has seen the validation images.

    Returns:
        ``(ProbeEnsemble, info, validation_scores)``: info ``{"C", "backbones", "cross_fit",
        "val_macro_ap_finetuned", "val_macro_ap", "seconds"}``; validation_scores ``{"plain", "flip_tta"}``
        with cross-fitting, else None. Without pretrained weights to probe, ``(finetuned, None, None)``.
    """
    start = time.perf_counter()
    probe, backbones = frozen_probe(backbone, probe_backbones, weights, train_set.targets.shape[1])
    if probe is None:
        return finetuned, None, None
    probe = probe.to(device)
    if channels_last:
        probe = probe.to(memory_format=torch.channels_last)
    probe.requires_grad_(False)
    spec = BACKBONES[backbone]
    args = (device, precision, channels_last, spec.mean, spec.std)
    def features(dataset: ImageDataset, flip: bool) -> np.ndarray:  # the head's inputs, (N, D)
        view = cache_view(dataset) if feature_cache and precision == "fp32" else None
        if view is None:
            return head_inputs(probe, mirrored(dataset) if flip else dataset, *args)
        return cached_features(backbones, list(probe.trunks), *view, flip=flip, cache_dir=view[0].root.parent,
                               device=device, channels_last=channels_last)

    feats, targets = features(train_set, False), train_set.targets.numpy()  # (N_train, D), (N_train, A)
    cross_fit = bool(cross_fit and len(val_set))
    fit = ProbeFit()
    if len(val_set):
        fit, val_feats = choose_probe_C(features, finetuned, feats, targets, val_set, val_groups, cross_fit, tta,
                                        seed, args)
        if cross_fit:
            feats, targets = np.concatenate([feats, val_feats]), np.concatenate([targets, val_set.targets.numpy()])
    fit_logistic_head(head_module(probe), feats, targets, fit.C, feats.mean(0), feats.std(0) + 1e-6)
    info = {"C": fit.C, "backbones": backbones, "cross_fit": cross_fit,
            "val_macro_ap_finetuned": fit.val_macro_ap_finetuned, "val_macro_ap": fit.val_macro_ap,
            "seconds": time.perf_counter() - start}
    return ProbeEnsemble(finetuned, probe.eval()), info, fit.scores
