"""What notebook 02 shows around training: one batch with its labels, masked against plain BCE, and
validation macro AP per epoch."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
import torch

from aimonk import plots
from aimonk.losses import MaskedBCEWithLogitsLoss, masked_vs_plain_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("pos_weight", [None, torch.tensor([3.0, 1.0])])
def test_masked_vs_plain_loss_by_hand(pos_weight):
    logits = torch.tensor([[2.0, 2.0], [0.0, 0.0]])
    targets = torch.tensor([[1.0, -1.0], [0.0, 0.0]])  # one NA, read as a 0 by plain BCE
    w = 1.0 if pos_weight is None else 3.0
    positive, na_as_negative, negative = w * softplus(-2.0), softplus(2.0), softplus(0.0)
    out = masked_vs_plain_loss(logits, targets, pos_weight)
    assert out["masked"] == pytest.approx((positive + 2 * negative) / 3, rel=1e-6)
    assert out["plain"] == pytest.approx((positive + na_as_negative + 2 * negative) / 4, rel=1e-6)
    assert out["na_share"] == 0.25


def test_masked_is_the_training_loss_and_equals_plain_without_na():
    torch.manual_seed(0)
    logits, pos_weight = torch.randn(8, 4), torch.tensor([0.5, 1.0, 2.0, 4.0])
    targets = torch.randint(0, 2, (8, 4)).float()
    out = masked_vs_plain_loss(logits, targets, pos_weight)
    assert out["masked"] == pytest.approx(out["plain"], rel=1e-6)
    assert out["na_share"] == 0.0
    targets[::2, 1] = -1
    out = masked_vs_plain_loss(logits, targets, pos_weight)
    assert out["masked"] == pytest.approx(MaskedBCEWithLogitsLoss(pos_weight)(logits, targets).item())
    assert out["na_share"] == pytest.approx(4 / 32)


def test_plot_batch_captions_each_image_with_1_0_or_na():
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    targets = torch.tensor([[1.0, -1.0, 0.0]] * 5)
    fig = plots.plot_batch(images, targets, ["A", "B", "C"], n=4, ncols=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["A 1  B NA\nC 0"] * 4
    assert fig.axes[0].get_images()[0].get_array().shape == (16, 16, 3)
    plt.close(fig)


@pytest.mark.parametrize("aps, best", [([0.5, 0.7, 0.6], 2), ([0.5, 0.7], None), ([], None)])
def test_plot_validation_ap_one_point_per_epoch_and_the_kept_epoch(aps, best):
    fig = plots.plot_validation_ap(aps, best_epoch=best)
    ax = fig.axes[0]
    assert list(ax.lines[0].get_xdata()) == list(range(1, len(aps) + 1))
    assert list(ax.lines[0].get_ydata()) == aps
    assert [line.get_label() for line in ax.lines[1:]] == ([f"kept: epoch {best}"] if best else [])
    plt.close(fig)
