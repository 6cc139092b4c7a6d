"""The training loop's parts: optimizer, schedule, augmentation, one epoch of training and validation."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from aimonk import config
from aimonk.data import ImageDataset, normalize_batch
from aimonk.inference import infer_probabilities
from aimonk.metrics import macro_average_precision
from aimonk.model import backbone_parameters
from aimonk.progress import tqdm
from aimonk.runtime import autocast
from aimonk.train.config import TrainConfig


class TrainingError(RuntimeError):
    """Training cannot go on; the message says where and why."""



def make_optimizer(params, name: str, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW, with the fused kernel on CPU and CUDA.

    ``params`` is an iterable of parameters or of param-group dicts (each may set its own ``lr``).

    The fused kernel updates every parameter in one pass instead of one kernel per parameter
    (measured by ``python -m aimonk.benchmark speed --tune --experiments optimizer``).
    """
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(name)
    if opt_cls is None:
        raise ValueError(f"optimizer must be adam or adamw, got {name!r}")
    return opt_cls(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))



def train_transform(augment: str, image_size: int, out_size: int | None = None) -> v2.Transform | None:
    """Augmentation applied to uint8 (3, S, S) tensors (S = ``image_size``), giving ``out_size`` px images
    (default S; smaller for the first epochs of progressive resizing: the crop itself is resized to it)."""
    out_size = out_size or image_size
    if augment in ("none", "flip") and out_size != image_size:
        resize = v2.Resize(out_size, antialias=True)
        return resize if augment == "none" else v2.Compose([resize, v2.RandomHorizontalFlip()])
    if augment == "none":
        return None
    if augment == "flip":
        return v2.RandomHorizontalFlip()
    crop = [v2.RandomResizedCrop(out_size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if augment == "crop":
        return v2.Compose(crop)
    if augment == "trivial":  # Müller & Hutter, ICCV 2021: one random photometric/geometric op per image
        return v2.Compose([*crop, v2.TrivialAugmentWide(fill=255)])  # white fill
    raise ValueError(f"augment must be none, flip, crop or trivial, got {augment!r}")



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
        bar.set_postfix(loss=f"{value:.4f}")
    return losses



def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """The per-iteration learning-rate schedule of ``cfg.schedule`` (None for a constant rate)."""
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



def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze every parameter but the head's."""
    for p in backbone_parameters(model):
        p.requires_grad_(trainable)



def validate(model: nn.Module, val_set: ImageDataset, device: torch.device, precision: str, channels_last: bool,
             mean, std, tta: bool) -> tuple[float, np.ndarray]:
    """Validation macro AP of ``model`` (eval mode, no gradients) and its probabilities (N_val, A)."""
    probs = infer_probabilities(model, val_set, device, precision, channels_last, mean, std, tta=tta, batch_size=64)
    return macro_average_precision(val_set.targets.numpy(), probs), probs
