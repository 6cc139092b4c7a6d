"""Training: the hyperparameter dataclass, the epoch loop and the end-to-end ``train`` entry point."""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset
from torchvision.transforms import v2
from aimonk.progress import tqdm

from aimonk import config, distributed, int8
from aimonk.cache import DecodedCache
from aimonk.data import ImageDataset, file_digest, index_dataset, make_split, normalize_batch, save_split
from aimonk.losses import MaskedBCEWithLogitsLoss, compute_pos_weight
from aimonk.model import (
    BACKBONES, CheckpointError, ProbeEnsemble, WeightsUnavailableError, backbone_parameters, build_model,
    feature_probe, head_module, head_parameters, is_random_init, safe_load, save_checkpoint,
)


@dataclass
class TrainConfig:
    """Every training choice in one place; the 02 notebook parameters and the CLI flags both fill it."""

    data_dir: str = str(config.SAMPLE_DIR)  # folder with labels.txt and images/
    out: str = str(config.DEFAULT_MODEL)  # where the trained checkpoint goes
    loss_plot: str = str(config.FIGURES_DIR / config.LOSS_PLOT_NAME)  # loss curve PNG ("" to skip)
    epochs: int = 20  # passes over the training set
    batch_size: int = 16  # images per optimisation step
    lr: float = 1e-4  # peak learning rate (of the head; the backbone gets lr * backbone_lr_mult)
    backbone_lr_mult: float = 1.0  # backbone lr as a share of lr (< 1 keeps pretrained features closer)
    optimizer: str = "adam"  # "adam" or "adamw"
    weight_decay: float = 0.0  # decoupled for adamw, L2 for adam
    schedule: str = "constant"  # "constant" or "cosine" (per-iteration, with warmup)
    warmup_epochs: float = 0.0  # linear warmup length for the cosine schedule
    freeze_epochs: int = 0  # train only the head for this many epochs first
    head_init: str = "random"  # "random" or "linear_probe" (fit the head on frozen features first: LP-FT)
    image_size: int = 224  # images are resized to image_size x image_size
    backbone: str = "resnet18"  # "resnet18", "efficientnet_lite0" (or _lite1, _lite2 with their weight package)
    weights: str = "imagenet"  # "imagenet", "none" (random init) or a path to a state dict
    on_missing_weights: str = "warn"  # "warn": random init + loud warning; "error": stop
    augment: str = "flip"  # "none", "flip", "crop" (RandomResizedCrop + flip) or "trivial" (crop + TrivialAugmentWide)
    loss_normalization: str = "known"  # "known" (mean over known labels) or "partial" (partial-BCE)
    ema_decay: float = 0.0  # exponential moving average of weights (0 = off)
    tta: bool = False  # average predictions over a horizontal flip at evaluation/inference
    probe_ensemble: bool = False  # average with a logistic-regression probe on the frozen pretrained network
    probe_cross_fit: bool = False  # refit the probe on training + validation images, scoring validation out of fold
    probe_backbones: str = ""  # comma-separated frozen networks whose concatenated features the probe reads ("" = backbone)
    keep_best: bool = False  # keep the epoch with the best validation macro AP (early stopping)
    val_fraction: float = 0.2  # share of images held out for validation (0 = none)
    seed: int = 0  # seeds the split, initialisation, shuffling and augmentation
    precision: str = "auto"  # "auto", "fp32", "bf16" or "fp16" (CUDA only)
    channels_last: bool = True  # NHWC memory format (faster on CPU and tensor cores)
    num_workers: int = 0  # DataLoader workers; cached uint8 reads are cheap, so 0 is fastest on 2 cores
    device: str = "auto"  # "auto" (cuda, then mps, then cpu) or an explicit torch device
    cache_dir: str = ""  # decoded-image cache ("" = ~/.cache/aimonk or $AIMONK_CACHE_DIR)
    resume: bool = False  # continue from the resumable checkpoint next to `out`
    progress: bool = True  # show tqdm progress bars

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict (e.g. notebook globals), ignoring keys that are not fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


ORIGINAL_RECIPE = dict(
    backbone="resnet18", optimizer="adam", lr=1e-4, batch_size=16, epochs=20, schedule="constant",
    augment="flip", freeze_epochs=0, ema_decay=0.0, tta=False, keep_best=False, loss_normalization="known",
    probe_ensemble=False, probe_cross_fit=False,
)  # the seed project's recipe, kept reproducible

PRETRAINED_RECIPE = dict(
    backbone="efficientnet_lite0", weights="imagenet", optimizer="adamw", lr=1e-3, backbone_lr_mult=0.3,
    weight_decay=0.01, batch_size=32, epochs=12, schedule="cosine", warmup_epochs=0.5, freeze_epochs=2,
    head_init="random", augment="crop", ema_decay=0.0, tta=True, keep_best=True, loss_normalization="known",
    image_size=224, probe_ensemble=True, probe_cross_fit=True, probe_backbones="efficientnet_lite0,efficientnet_lite1",
)  # ImageNet fine-tuning that runs offline: the best measured on clipart (README "Model quality"), the 02 default


RECIPES = {"pretrained": PRETRAINED_RECIPE, "original": ORIGINAL_RECIPE}  # name -> preset; "pretrained" is the default


def recipe_config(recipe: str = "pretrained", **values) -> TrainConfig:
    """A ``TrainConfig`` from a named preset in ``RECIPES``, with ``values`` (e.g. data_dir, epochs) on top."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return TrainConfig.from_dict({**RECIPES[recipe], **values})


class TrainingError(RuntimeError):
    """Training cannot go on; the message says where and why."""


@dataclass
class TrainResult:
    """What ``train`` produced."""

    model: nn.Module
    meta: dict
    checkpoint: Path
    loss_plot: Path | None
    history: dict = field(default_factory=dict)
    seconds: float = 0.0


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; anything else is passed to ``torch.device``."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device, backbone: str) -> str:
    """Turn ``"auto"`` into the measured-fastest safe choice for this device and backbone."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and BACKBONES[backbone].cpu_bf16 and cpu_supports_bf16():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32 and for an int8 model)."""
    if precision in ("fp32", "int8"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_optimizer(params, name: str, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW, with the fused kernel on CPU and CUDA.

    ``params`` is an iterable of parameters or of param-group dicts (each may set its own ``lr``).

    The fused kernel updates every parameter in one pass. On the shared 2-core CPU a ResNet18 bf16
    epoch was 1.3x faster than with the default per-parameter loop while the machine was busy, and
    about as fast when it was idle (``python -m aimonk.benchmark speed --tune --experiments optimizer``).
    """
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(name)
    if opt_cls is None:
        raise ValueError(f"optimizer must be adam or adamw, got {name!r}")
    return opt_cls(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))


def train_transform(augment: str, image_size: int) -> v2.Transform | None:
    """Augmentation applied to uint8 (3, S, S) tensors."""
    if augment == "none":
        return None
    if augment == "flip":
        return v2.RandomHorizontalFlip()
    crop = [v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if augment == "crop":
        return v2.Compose(crop)
    if augment == "trivial":  # Müller & Hutter, ICCV 2021: one random photometric/geometric op per image
        return v2.Compose([*crop, v2.TrivialAugmentWide(fill=255)])  # white fill
    raise ValueError(f"augment must be none, flip, crop or trivial, got {augment!r}")


def check_writable(path: Path) -> None:
    """Fail now, not after training, if ``path``'s folder cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".aimonk-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"{path.parent}: output folder is not writable ({e.strerror or e})") from None


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    mean=config.IMAGENET_MEAN,
    std=config.IMAGENET_STD,
    scheduler=None,
    scaler: torch.amp.GradScaler | None = None,
    ema: nn.Module | None = None,
    epoch: int = 0,
    progress: bool = True,
    on_step: Callable[[float], None] | None = None,
    reduce_loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[float]:
    """Run one pass over ``loader``.

    ``reduce_loss(loss, targets)`` gives (the loss to back-propagate, the loss to record); under
    torchrun it makes both the global batch's, so every process records and checks the same value.

    Returns:
        The loss of every iteration.
    Raises:
        TrainingError: on a non-finite loss, naming the epoch and batch.
    """
    model.train()
    losses: list[float] = []
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress, unit="batch")
    for step, (x, y) in enumerate(bar):
        x = normalize_batch(x, device, mean, std, channels_last)  # (B, 3, S, S) float
        y = y.to(device, non_blocking=True)  # (B, n_attributes), -1 = NA
        with autocast(device, precision):
            logits = model(x)  # (B, n_attributes)
        loss = criterion(logits.float(), y)
        loss, reported = (loss, loss.detach()) if reduce_loss is None else reduce_loss(loss, y)
        if not torch.isfinite(reported):
            raise TrainingError(
                f"non-finite loss ({reported.item()}) at epoch {epoch + 1}, batch {step + 1}; "
                "try a lower lr or precision='fp32'"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        value = reported.item()
        losses.append(value)
        if on_step is not None:
            on_step(value)
        bar.set_postfix(loss=f"{value:.4f}")
    return losses


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
    from aimonk.predict import infer_probabilities

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
    from sklearn.linear_model import LogisticRegression

    shift = np.zeros(feats.shape[1]) if shift is None else shift
    scale = np.ones(feats.shape[1]) if scale is None else scale
    z = (feats - shift) / scale
    for j in range(targets.shape[1]):
        known = targets[:, j] >= 0
        y = targets[known, j].astype(int)
        if 0 < y.sum() < len(y):
            clf = LogisticRegression(C=C, max_iter=2000, class_weight="balanced").fit(z[known], y)
            w = clf.coef_[0] / scale
            head.weight[j] = torch.from_numpy(w).to(head.weight)
            head.bias[j] = float(clf.intercept_[0] - w @ shift)


PROBE_C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
"""Inverse L2 strengths tried for the probe on standardised features; validation picks one."""
PROBE_C_DEFAULT = 0.01  # the probe's C when there is no validation split
PROBE_CROSS_FIT_FOLDS = 5  # validation folds for the out-of-fold probe scores of probe_cross_fit


def logistic_probabilities(feats: np.ndarray, targets: np.ndarray, C: float,
                           predict_on: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Fit ``fit_logistic_head`` on standardised ``feats`` and return its probabilities on each of ``predict_on``.

    An attribute with a single known class gets probability 0.5 everywhere.
    """
    head = nn.Linear(feats.shape[1], targets.shape[1]).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    fit_logistic_head(head, feats, targets, C, feats.mean(0), feats.std(0) + 1e-6)
    with torch.no_grad():
        return [torch.sigmoid(head(torch.from_numpy(f).double())).float().numpy() for f in predict_on]


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
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[g]: i % n_folds for i, g in enumerate(order)}
    fold = np.array([fold_of[g] for g in groups])
    out = [np.zeros((len(targets), base_targets.shape[1]), np.float32) for _ in views]
    for k in np.unique(fold):
        held, rest = fold == k, fold != k
        probs = logistic_probabilities(np.concatenate([base_feats, views[0][rest]]),
                                       np.concatenate([base_targets, targets[rest]]), C, [v[held] for v in views])
        for o, p in zip(out, probs):
            o[held] = p
    return out


def ensemble_probabilities(finetuned: Sequence[np.ndarray], probe: Sequence[np.ndarray]) -> np.ndarray:
    """What ``ProbeEnsemble`` outputs, from each member's probabilities per view (plain, then flipped):
    the mean of the two members per view, and with two views the flip TTA of ``infer_probabilities``
    (the sigmoid of the mean logit)."""
    logits = [torch.logit((torch.from_numpy(f) + torch.from_numpy(p)) / 2, eps=1e-6) for f, p in zip(finetuned, probe)]
    return torch.sigmoid(torch.stack(logits).mean(0)).numpy()


def probe_backbone_list(cfg: TrainConfig) -> list[str]:
    """The backbones named in ``cfg.probe_backbones`` (default: ``cfg.backbone``); unknown names are refused."""
    backbones = [b.strip() for b in cfg.probe_backbones.split(",") if b.strip()] or [cfg.backbone]
    unknown = [b for b in backbones if b not in BACKBONES]
    if unknown:
        raise ValueError(f"unknown probe_backbones {unknown}; choose from {sorted(BACKBONES)}")
    return backbones


def fit_probe(finetuned: nn.Module, cfg: TrainConfig, train_set: ImageDataset, val_set: ImageDataset,
              device: torch.device, precision: str, val_groups: Sequence[str] | None = None
              ) -> tuple[nn.Module, dict | None, dict | None]:
    """Average ``finetuned`` with a logistic-regression probe on the frozen pretrained network.

    The probe (``model.FeatureProbe``) reads the concatenated features of the frozen pretrained
    networks named in ``cfg.probe_backbones`` (default: the fine-tuned backbone); its head is fitted
    (``fit_logistic_head``, standardised features, no augmentation). Its C is the value of
    ``PROBE_C_GRID`` that gives the averaged model the best validation macro AP. Validation scores always come from probes that did not see the
    image scored, so thresholds tuned on them stay honest:

    - ``cfg.probe_cross_fit=False``: the probe is fitted on the training part only.
    - ``cfg.probe_cross_fit=True``: the scores of each validation image come from a probe fitted on
      the training part plus the other validation folds (``out_of_fold_probabilities``, folds grouped
      by ``val_groups``); the saved probe is then refitted on training + validation images. Those
      out-of-fold scores are returned, because the saved model has seen the validation images.

    Returns:
        ``(ProbeEnsemble, info, validation_scores)``: info ``{"C", "backbones", "cross_fit", "val_macro_ap_finetuned",
        "val_macro_ap", "seconds"}``; validation_scores ``{"plain", "flip_tta"}`` (out-of-fold ensemble
        probabilities without and with flip TTA) with cross-fitting, else None. Without pretrained
        weights to probe, ``(finetuned, None, None)`` and a warning.
    """
    from aimonk.evaluate import macro_average_precision
    from aimonk.predict import infer_probabilities

    start = time.perf_counter()
    spec = BACKBONES[cfg.backbone]
    n_attr = train_set.targets.shape[1]
    skip = "probe_ensemble skipped: it needs pretrained weights"
    if is_random_init(cfg.weights):
        warnings.warn(f"{skip}, and weights={cfg.weights!r}", stacklevel=3)
        return finetuned, None, None
    backbones = probe_backbone_list(cfg)
    odd = [b for b in backbones if (BACKBONES[b].mean, BACKBONES[b].std) != (spec.mean, spec.std)]
    if odd:  # the ensemble feeds both members the fine-tuned backbone's normalisation
        warnings.warn(f"the probe reads {cfg.backbone} only: probe_backbones {odd} normalise their inputs "
                      f"differently from backbone {cfg.backbone!r}", stacklevel=3)
        backbones = [cfg.backbone]
    try:
        probe = feature_probe(backbones, n_attr, cfg.weights)
    except WeightsUnavailableError as e:
        if backbones == [cfg.backbone]:
            warnings.warn(f"{skip} ({e})", stacklevel=3)
            return finetuned, None, None
        warnings.warn(f"the probe reads {cfg.backbone} only: {e}", stacklevel=3)  # the fine-tuned one has weights
        return fit_probe(finetuned, replace(cfg, probe_backbones=cfg.backbone), train_set, val_set, device, precision,
                         val_groups)
    probe = probe.to(device)
    if cfg.channels_last:
        probe = probe.to(memory_format=torch.channels_last)
    probe.requires_grad_(False)
    args = (device, precision, cfg.channels_last, spec.mean, spec.std)
    feats, targets = head_inputs(probe, train_set, *args), train_set.targets.numpy()  # (N_train, D), (N_train, A)
    head = head_module(probe)
    info = {"C": PROBE_C_DEFAULT, "backbones": backbones, "cross_fit": bool(cfg.probe_cross_fit and len(val_set)),
            "val_macro_ap_finetuned": None, "val_macro_ap": None}
    scores = None
    if len(val_set):
        val_y = val_set.targets.numpy()
        flipped = ImageDataset(val_set.images, val_y, v2.RandomHorizontalFlip(p=1.0))
        views = [val_set, flipped] if cfg.tta else [val_set]  # the saved model's flip TTA, view by view
        val_feats = [head_inputs(probe, v, *args) for v in views]
        p_ft = [infer_probabilities(finetuned, v, *args) for v in views]
        info["val_macro_ap_finetuned"] = macro_average_precision(
            val_y, infer_probabilities(finetuned, val_set, *args, tta=cfg.tta))
        if info["cross_fit"]:
            groups = list(val_groups) if val_groups is not None else [str(i) for i in range(len(val_y))]
            p_probe = {C: out_of_fold_probabilities(feats, targets, val_feats, val_y, groups, C, seed=cfg.seed)
                       for C in PROBE_C_GRID}
        else:
            p_probe = {C: logistic_probabilities(feats, targets, C, val_feats) for C in PROBE_C_GRID}
        val_ap = {C: macro_average_precision(val_y, ensemble_probabilities(p_ft, p)) for C, p in p_probe.items()}
        info["C"] = max(val_ap, key=val_ap.get)
        info["val_macro_ap"] = val_ap[info["C"]]  # what the saved ensemble scores (out of fold when cross-fitted)
        if info["cross_fit"]:
            best = p_probe[info["C"]]
            scores = {"plain": ensemble_probabilities(p_ft[:1], best[:1]),
                      "flip_tta": ensemble_probabilities(p_ft, best) if cfg.tta else None}
            feats, targets = np.concatenate([feats, val_feats[0]]), np.concatenate([targets, val_y])
    fit_logistic_head(head, feats, targets, info["C"], feats.mean(0), feats.std(0) + 1e-6)
    ensemble = ProbeEnsemble(finetuned, probe.eval())
    info["seconds"] = time.perf_counter() - start
    return ensemble, info, scores


def _make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.schedule == "constant":
        return None
    if cfg.schedule != "cosine":
        raise ValueError(f"schedule must be constant or cosine, got {cfg.schedule!r}")
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resume_path(out: str | os.PathLike) -> Path:
    """Where the per-epoch resumable state for ``out`` lives."""
    out = Path(out)
    return out.with_name(out.stem + ".resume" + out.suffix)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_data(cfg: TrainConfig, names: Sequence[str] | None = None):
    """Index the folder, split it by content hash, and decode images into the cache.

    Args:
        cfg: the training configuration.
        names: restrict to these image names (e.g. the training part of a cross-validation fold).
    Returns:
        ``(index, cache, train_idx, val_idx)`` with indices into ``index.table`` (unreadable
        images already removed).
    """
    index = index_dataset(cfg.data_dir)
    if names is not None:
        keep = set(names)
        rows = [i for i, n in enumerate(index.table.names) if n in keep]
        index = replace(index, table=index.table.subset(rows), paths=[index.paths[i] for i in rows])
    digests = [file_digest(p) for p in index.paths]
    cache = DecodedCache(index.paths, cfg.image_size, cfg.cache_dir or None, digests=digests, progress=cfg.progress)
    ok = np.asarray(cache.ok)
    if len(ok) == 0:
        raise TrainingError(f"{cfg.data_dir}: no readable images")
    targets = index.table.targets[ok]
    if cfg.val_fraction > 0:
        tr, va = make_split(targets, [digests[i] for i in ok], cfg.val_fraction, cfg.seed)
        train_idx, val_idx = ok[tr], ok[va]
    else:
        train_idx, val_idx = ok, ok[:0]
    return index, cache, train_idx, val_idx


def train(cfg: TrainConfig, names: Sequence[str] | None = None) -> TrainResult:
    """Train a model end to end and write the checkpoint, the split and the loss plot.

    Writes ``cfg.out`` (the self-describing checkpoint), ``split.json`` next to it, the loss plot,
    and a resumable state file after each epoch (removed when training completes).

    Under torchrun (``torchrun --nproc_per_node N -m aimonk train ...``) every process runs this
    with DistributedDataParallel: ``cfg.batch_size`` is the global batch, shared equally; the loss
    history is the mean over processes; rank 0 alone validates, writes files and shows progress.

    Args:
        cfg: the training configuration.
        names: train (and validate) only on these image names; default all.
    Returns:
        A ``TrainResult`` (on every process; its files are rank 0's).
    """
    with distributed.process_group(select_device(cfg.device)) as device:
        if distributed.is_main():
            return _train(cfg, names, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank 0 reports data and recipe warnings once
            return _train(replace(cfg, progress=False), names, device)


def _train(cfg: TrainConfig, names: Sequence[str] | None, device: torch.device) -> TrainResult:
    from aimonk.evaluate import macro_average_precision
    from aimonk.plots import plot_loss_curve
    from aimonk.predict import infer_probabilities

    start = time.perf_counter()
    out = Path(cfg.out)
    main = distributed.is_main()  # only rank 0 writes files
    if main:
        check_writable(out)
        if cfg.loss_plot:
            check_writable(Path(cfg.loss_plot))
    batch_size = distributed.per_rank_batch(cfg.batch_size)  # this process's share of the global batch
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.precision, device, cfg.backbone)
    spec = BACKBONES.get(cfg.backbone)
    if spec is None:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose one of {sorted(BACKBONES)}")
    if cfg.probe_ensemble:
        probe_backbone_list(cfg)  # refuse a misspelt name before training, not after

    with distributed.local_main_first():  # one process per machine fills the decoded-image cache
        index, cache, train_idx, val_idx = prepare_data(cfg, names)
    attributes = index.attributes
    train_targets = index.table.targets[train_idx]
    if len(train_idx) < 2:
        raise TrainingError(f"{cfg.data_dir}: {len(train_idx)} training image(s) after the validation split; "
                            "need at least 2 (add images or lower val_fraction)")
    decisions = initial_decisions(train_targets, attributes)
    split_file = out.with_name(config.SPLIT_NAME)
    if main:
        save_split(
            split_file,
            [index.table.names[i] for i in train_idx],
            [index.table.names[i] for i in val_idx],
            data_dir=str(cfg.data_dir), seed=cfg.seed, val_fraction=cfg.val_fraction,
        )
    pos_weight = compute_pos_weight(train_targets, attributes)
    train_names = hashlib.sha256("\n".join(index.table.names[i] for i in train_idx).encode()).hexdigest()
    distributed.check_same((train_names, pos_weight.tolist()), "the training split or pos_weight")

    model = build_model(cfg.backbone, len(attributes), cfg.weights, cfg.on_missing_weights).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = MaskedBCEWithLogitsLoss(pos_weight, cfg.loss_normalization).to(device)
    train_set = ImageDataset(Subset(cache, train_idx), train_targets, train_transform(cfg.augment, cfg.image_size))
    val_set = ImageDataset(Subset(cache, val_idx), index.table.targets[val_idx])
    train_plain = ImageDataset(Subset(cache, train_idx), train_targets)  # no augmentation: what probes are fitted on
    if cfg.head_init == "linear_probe" and not (cfg.resume and resume_path(out).is_file()):
        # Every process fits the same head on the same images, so the weights stay identical.
        linear_probe_head(model, train_plain, device, precision, cfg.channels_last, spec.mean, spec.std)
    elif cfg.head_init not in ("random", "linear_probe"):
        raise ValueError(f"head_init must be random or linear_probe, got {cfg.head_init!r}")
    groups = [{"params": backbone_parameters(model), "lr": cfg.lr * cfg.backbone_lr_mult},
              {"params": head_parameters(model), "lr": cfg.lr}]
    optimizer = make_optimizer(groups, cfg.optimizer, cfg.lr, cfg.weight_decay, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    ema = None
    if cfg.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)

    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                     persistent_workers=cfg.num_workers > 0)
    # BatchNorm cannot train on a batch of one image, so a lone last image is left out of that epoch
    # (the shuffle differs per epoch, so a different image each time).
    # Under torchrun each process takes its interleaved share of the same shuffle, padded to equal length.
    n_local = math.ceil(len(train_set) / distributed.world_size())
    drop_last = n_local % batch_size == 1
    steps_per_epoch = n_local // batch_size if drop_last else math.ceil(n_local / batch_size)
    # The shuffle is randperm(n) seeded by (seed, epoch), drawn by the sampler: the same permutation for
    # any number of processes, each taking its share. (A DataLoader's own shuffle also depends on how
    # often the loader is iterated; tqdm.auto calls iter() once more.)
    sampler = distributed.epoch_sampler(train_set, cfg.seed * 1000)
    reduce_loss = None
    if distributed.world_size() > 1:
        def reduce_loss(loss, y):  # each process's mean loss, weighted into the global batch's
            return distributed.global_mean_loss(loss, criterion.normalizer(y))
    scheduler = _make_scheduler(optimizer, cfg, steps_per_epoch)

    history = {"loss": [], "epoch_loss": [], "val_macro_ap": [], "epoch_seconds": []}
    start_epoch, best_ap, best_state = 0, -1.0, None
    state_file = resume_path(out)
    if cfg.resume and distributed.from_main(state_file.is_file):  # rank 0's file, sent to every process
        try:
            state = distributed.from_main(lambda: safe_load(state_file))
        except CheckpointError as e:
            raise TrainingError(f"{e}; delete it or drop resume") from None
        saved = state.get("config") if isinstance(state, dict) else None
        if saved != _resumable_config(cfg):
            changed = sorted(k for k, v in _resumable_config(cfg).items() if (saved or {}).get(k) != v)
            raise TrainingError(f"{state_file}: saved with a different configuration ({', '.join(changed)}); "
                                "delete it or drop resume")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            history, start_epoch = state["history"], state["epoch"]
            best_ap, best_state = state["best_ap"], state["best_state"]
        except (KeyError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TrainingError(f"{state_file}: cannot resume from it ({first[:200]}); "
                                "delete it or drop resume") from None
        print(f"Resuming from {state_file} after epoch {start_epoch}")
    elif cfg.resume:
        print(f"No resumable state at {state_file}; starting from scratch")

    # DistributedDataParallel under torchrun (frozen parameters are then "unused"), else the model itself.
    trained = distributed.wrap(model, device, find_unused_parameters=cfg.freeze_epochs > 0)
    epochs_bar = tqdm(range(start_epoch, cfg.epochs), desc="training", unit="epoch", disable=not cfg.progress,
                      initial=start_epoch, total=cfg.epochs)
    for epoch in epochs_bar:
        set_seed(distributed.rank_seed(cfg.seed * 1000 + epoch))  # per-epoch seeding makes a resumed run replay exactly
        _set_backbone_trainable(model, epoch >= cfg.freeze_epochs)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=batch_size, sampler=sampler, drop_last=drop_last,  # the generator seeds workers
            generator=torch.Generator().manual_seed(distributed.rank_seed(cfg.seed * 1000 + epoch)), **loader_kw,
        )
        t0 = time.perf_counter()
        try:
            losses = train_one_epoch(trained, loader, criterion, optimizer, device, precision, cfg.channels_last,
                                     spec.mean, spec.std, scheduler, scaler, ema, epoch, cfg.progress,
                                     reduce_loss=reduce_loss)
        except TrainingError as e:
            kept = (f"the state after epoch {epoch} is kept in {state_file} (resume=True continues from it)"
                    if epoch > 0 else "no epoch had completed, so no state was saved")
            raise TrainingError(f"{e}. {kept[0].upper()}{kept[1:]}") from None
        history["loss"].extend(losses)
        history["epoch_loss"].append(float(np.mean(losses)))
        history["epoch_seconds"].append(time.perf_counter() - t0)
        scored = ema.module if ema is not None else model
        if len(val_set) and main:  # the other processes go on to the next epoch's first gradient exchange
            probs = infer_probabilities(scored, val_set, device, precision, cfg.channels_last, spec.mean, spec.std,
                                        tta=cfg.tta, batch_size=64)
            ap = macro_average_precision(val_set.targets.numpy(), probs)
            history["val_macro_ap"].append(ap)
            if cfg.keep_best and ap > best_ap:
                best_ap = ap
                best_state = {k: v.detach().cpu().clone() for k, v in scored.state_dict().items()}
        epochs_bar.set_postfix(loss=f"{history['epoch_loss'][-1]:.4f}",
                               val_ap=f"{history['val_macro_ap'][-1]:.3f}" if history["val_macro_ap"] else "-")
        if main:
            _atomic_torch_save({
                "config": _resumable_config(cfg), "epoch": epoch + 1, "history": history,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "best_ap": best_ap, "best_state": best_state,
            }, state_file)

    distributed.check_same(distributed.weights_digest(model), "the trained weights")
    final = ema.module if ema is not None else model
    if cfg.keep_best and best_state is not None:
        final.load_state_dict(best_state)
        history["best_epoch"] = int(np.argmax(history["val_macro_ap"])) + 1
    probe = val_scores = None
    if cfg.probe_ensemble:
        final, probe, val_scores = fit_probe(final, cfg, train_plain, val_set, device, precision,
                                             val_groups=[cache.digests[i] for i in val_idx])
    final = final.to("cpu").to(memory_format=torch.contiguous_format).eval()
    int8_calibration = _int8_calibration(final, cfg, len(attributes), train_plain, probe) if main else None
    meta = {
        "backbone": cfg.backbone,
        "attributes": list(attributes),
        "image_size": cfg.image_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "thresholds": [0.5] * len(attributes),
        "decision": decisions,
        "tta": cfg.tta,
        "probe": probe,  # the probe ensemble's C and validation macro AP, or None
        "pos_weight": pos_weight.tolist(),
        "precision": precision,
        "config": asdict(cfg),
        "history": history,
        "split": {"file": str(split_file), "val": [index.table.names[i] for i in val_idx]},
        # honest validation probabilities when the saved model has seen the validation images (probe_cross_fit)
        "validation_scores": None if val_scores is None else {
            "names": [index.table.names[i] for i in val_idx],
            **{k: None if v is None else v.tolist() for k, v in val_scores.items()}},
        "data": {"dir": str(cfg.data_dir), "missing": index.missing, "unreadable": sorted(cache.failed.values())},
        "int8": int8_calibration,  # activation ranges for int8 inference (Predictor precision "int8"), or None
    }
    checkpoint = save_checkpoint(out, final, meta) if main else out
    if main:
        state_file.unlink(missing_ok=True)
    plot_path = None
    if cfg.loss_plot and main:
        plot_path = Path(cfg.loss_plot)
        fig = plot_loss_curve(history["loss"], steps_per_epoch)
        fig.savefig(plot_path, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
    distributed.barrier()  # every process returns once rank 0 has written the checkpoint
    return TrainResult(final, meta, checkpoint, plot_path, history, time.perf_counter() - start)


def _int8_calibration(model: nn.Module, cfg: TrainConfig, n_attributes: int, dataset: ImageDataset,
                      probe: dict | None) -> dict | None:
    """int8 calibration for the checkpoint, or None where its model cannot run in int8 (or calibration
    fails, with a warning: the trained model is saved either way)."""
    if int8.unsupported({"backbone": cfg.backbone, "probe": probe}):
        return None
    spec = BACKBONES[cfg.backbone]
    try:
        plain = build_model(cfg.backbone, n_attributes, weights="none")  # as loaded: no distributed BatchNorm
        plain.load_state_dict(model.state_dict())
        return int8.calibrate(plain.eval(), dataset, cfg.image_size, spec.mean, spec.std)
    except Exception as e:  # an optional extra must not cost the training run
        warnings.warn(f"int8 calibration failed ({str(e)[:200]}); the checkpoint is saved without it "
                      "(python -m aimonk calibrate-int8 can add it later)")
        return None


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


def _resumable_config(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    for k in ("resume", "progress", "num_workers", "cache_dir", "loss_plot"):
        d.pop(k)
    return d


def _set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    for p in backbone_parameters(model):
        p.requires_grad_(trainable)
