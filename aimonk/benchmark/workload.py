"""The speed benchmark's workload: its settings, and the images that the comparison and the tuning both use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aimonk.data import index_dataset


@dataclass
class SpeedConfig:
    """What the speed benchmark runs; the CLI flags fill it."""

    data_dir: str  # folder with labels.txt and images/
    epochs: int = 3  # training epochs for each loop (>= 2 gives a steady state)
    image_size: int = 224  # images are resized to image_size x image_size
    batch_size: int = 16  # training batch size, both loops
    backbone: str = "resnet18"  # "resnet18" or "efficientnet_lite0"
    limit: int = 0  # use this many images, evenly spaced over labels.txt (0 = all)
    device: str = "auto"  # "auto", "cpu" or "cuda"
    precision: str = "auto"  # the project loop's precision ("auto" = per backbone and device)
    channels_last: bool = True  # the project loop's memory format
    num_workers: int = 0  # the project loop's DataLoader workers
    infer_batch_size: int = 32  # batch size of batched inference, both loops
    latency_calls: int = 20  # single-image predictions timed for the latency median
    peak_size: int = 4096  # side of the square bf16 matmul that measures the reference peak
    seed: int = 0  # model initialisation and shuffling
    tune_images: int = 128  # tuning: images per tuning epoch
    tune_rounds: int = 3  # tuning: rounds of every variant (medians over rounds)
    experiments: str = "loader,precision,optimizer,fold"  # tuning: which experiments, comma-separated
    compile: bool = False  # tuning: also measure torch.compile
    int8: bool = True  # also compare inference with the project's model in int8 (CPU, backbones with cpu_int8)


def select_rows(n: int, limit: int) -> np.ndarray:
    """``limit`` row indices spread evenly over ``n`` rows (all rows if ``limit`` is 0 or too big)."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def load_images(cfg: SpeedConfig):
    """The benchmark's images and targets, with every file read once so both loops find it in the OS cache.

    Returns:
        ``(index, paths, targets)``: the folder's index, the chosen image paths and their
        (N, n_attributes) targets.
    """
    index = index_dataset(cfg.data_dir, warn=False)
    rows = select_rows(len(index.paths), cfg.limit)
    paths = [index.paths[i] for i in rows]
    for p in paths:
        p.read_bytes()
    return index, paths, index.table.targets[rows]


def drop_lone_last(n: int, batch_size: int) -> bool:
    """Whether a training loader over ``n`` images drops its last batch."""
    return n % batch_size == 1  # a lone last image breaks BatchNorm in train mode
