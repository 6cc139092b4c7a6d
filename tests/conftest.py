"""Shared fixtures for tests/. The root conftest.py points every output folder at a temporary directory."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

ATTRIBUTES = ["Attr1", "Attr2", "Attr3", "Attr4"]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The embedded sample dataset (read only: never write into it)."""
    from aimonk import config

    return config.SAMPLE_DIR


@pytest.fixture(scope="session")
def trained(tmp_path_factory, sample_dir):
    """A ResNet18 trained for one epoch at 32 px on the sample (no download): a ``TrainResult``.

    Tests that change the checkpoint must copy it first (see ``trained_copy``).
    """
    from aimonk.train import TrainConfig, train

    folder = tmp_path_factory.mktemp("trained")
    # batch 24: 161 training images never leave a lone last batch of one
    cfg = TrainConfig(data_dir=str(sample_dir), epochs=1, image_size=32, batch_size=24, weights="none",
                      int8_calibration=True, out=str(folder / "model.pth"), loss_plot=str(folder / "loss_curve.png"),
                      progress=False)
    with pytest.warns(UserWarning, match="not found"):  # the sample's one missing image
        return train(cfg)


@pytest.fixture
def trained_copy(trained, tmp_path) -> Path:
    """A private copy of the session checkpoint that a test may overwrite."""
    return Path(shutil.copy(trained.checkpoint, tmp_path / "model.pth"))


@pytest.fixture(scope="session")
def make_constant_checkpoint():
    """Factory ``make(probs, path, image_size=32, **meta)``: a checkpoint whose model outputs ``probs`` for every image.

    The ResNet18 head has zero weights and bias ``logit(p)``, so the probabilities are known
    exactly (up to bf16 rounding) whatever the input. Extra keyword arguments go into the metadata.
    """
    import torch

    from aimonk import config
    from aimonk.checkpoint import save_checkpoint
    from aimonk.model import build_model

    def make(probs, path: Path, image_size: int = 32, **meta) -> Path:
        torch.manual_seed(0)
        model = build_model("resnet18", len(probs), weights="none").eval()
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.copy_(torch.tensor([_logit(p) for p in probs]))
        attributes = meta.pop("attributes", [f"Attr{j + 1}" for j in range(len(probs))])
        full = {
            "backbone": "resnet18", "attributes": attributes, "image_size": image_size,
            "mean": list(config.IMAGENET_MEAN), "std": list(config.IMAGENET_STD),
            "thresholds": [0.5] * len(probs), "decision": ["threshold"] * len(probs), **meta,
        }
        return save_checkpoint(path, model, full)

    return make


@pytest.fixture
def constant_checkpoint(make_constant_checkpoint, tmp_path):
    """``make_constant_checkpoint`` writing to ``tmp_path / "constant.pth"`` unless given a path."""

    def make(probs, path: Path | None = None, **kw) -> Path:
        return make_constant_checkpoint(probs, path or tmp_path / "constant.pth", **kw)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: faster on a shared 2-core machine, and both runs of a compared pair
    (and the subprocesses, which set OMP_NUM_THREADS=1) use the same count, so results match exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
