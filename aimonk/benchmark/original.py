"""The seed project's plain loop, the speed benchmark's baseline.

A Dataset that PIL-decodes every image on every access through torchvision transforms
(``Resize((S, S))``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``), fp32 NCHW,
``num_workers=0``; training steps and inference written the way the original solution wrote them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from aimonk import config


def original_transform(image_size: int, train: bool, mean=config.IMAGENET_MEAN, std=config.IMAGENET_STD):
    """The original solution's torchvision preprocessing, on full-resolution PIL images."""
    from torchvision import transforms as T

    steps = [T.Resize((image_size, image_size))]
    if train:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class OriginalDataset(Dataset):
    """The original-style dataset: opens and decodes the JPEG with PIL on every access."""

    def __init__(self, paths: Sequence[Path], targets: np.ndarray, transform):
        self.paths = list(paths)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            x = self.transform(img.convert("RGB"))  # (3, S, S) float32, normalised
        return x, self.targets[i]


def original_train_step(model: nn.Module, batch, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                        device: torch.device) -> float:
    """One fp32 NCHW optimisation step, the way the original solution trains (``model.train()`` is the caller's).

    Returns:
        The loss.
    """
    x, y = batch[0].to(device), batch[1].to(device)  # (B, 3, S, S), (B, n_attributes)
    logits = model(x)  # (B, n_attributes)
    loss = criterion(logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def original_infer(model: nn.Module, paths: Sequence[Path], transform, device: torch.device,
                   batch_size: int) -> np.ndarray:
    """Probabilities the original way: PIL decode per image, fp32 NCHW batches (N, n_attributes)."""
    model.eval()
    ds = OriginalDataset(paths, np.zeros((len(paths), 1)), transform)
    out = [torch.sigmoid(model(x.to(device))).cpu() for x, _ in DataLoader(ds, batch_size=batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def original_predict_one(model: nn.Module, path: Path, transform, device: torch.device) -> torch.Tensor:
    """One image the original way: PIL decode, fp32 NCHW forward (``model.eval()`` is the caller's).

    Returns:
        Probabilities, (1, n_attributes), on the CPU.
    """
    from PIL import Image

    with Image.open(path) as img:
        x = transform(img.convert("RGB"))[None].to(device)  # (1, 3, S, S)
    return torch.sigmoid(model(x)).cpu()
