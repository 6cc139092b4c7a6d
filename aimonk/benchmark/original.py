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


def original_train(data_dir: str | Path, epochs: int, out: str | Path, batch_size: int = 16,
                   image_size: int = 224, weights: str = "imagenet") -> int:
    """The seed's training script, the end-to-end benchmark's baseline: ResNet18, Adam 1e-4, batch 16, fp32
    NCHW, PIL decode on every access, every labelled image trained on, NA masked, ``pos_weight``; saves the
    state dict. Returns the number of images it trained on."""
    from aimonk.data import index_dataset
    from aimonk.losses import MaskedBCEWithLogitsLoss, compute_pos_weight
    from aimonk.model import build_model

    index = index_dataset(data_dir)
    targets = index.table.targets  # (N, A), -1 for NA
    model = build_model("resnet18", targets.shape[1], weights)
    criterion = MaskedBCEWithLogitsLoss(compute_pos_weight(targets))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = DataLoader(OriginalDataset(index.paths, targets, original_transform(image_size, True)),
                        batch_size=batch_size, shuffle=True)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            original_train_step(model, batch, criterion, optimizer, torch.device("cpu"))
    torch.save(model.state_dict(), out)
    return len(index.paths)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m aimonk.benchmark.original",
                                description="the seed's training script (the end-to-end benchmark's baseline)")
    p.add_argument("--data", required=True, help="folder with labels.txt and images/")
    p.add_argument("--epochs", type=int, default=20, help="passes over every labelled image")
    p.add_argument("--out", required=True, help="where the state dict goes")
    p.add_argument("--image-size", type=int, default=224, help="images are resized to this square size")
    p.add_argument("--weights", default="imagenet", help='"imagenet" (random init, with a warning, when absent) or "none"')
    a = p.parse_args(argv)
    n = original_train(a.data, a.epochs, a.out, image_size=a.image_size, weights=a.weights)
    print(f"Saved {a.out} ({n} images, {a.epochs} epochs)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
