"""pos_weight and the NA-masked BCE loss, checked against values worked out by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from aimonk.losses import MaskedBCEWithLogitsLoss, compute_pos_weight


def bce(logit: float, y: int, w: float = 1.0) -> float:
    """Binary cross-entropy of one logit, written out: -(w*y*log(s) + (1-y)*log(1-s))."""
    s = 1 / (1 + math.exp(-logit))
    return -(w * y * math.log(s) + (1 - y) * math.log(1 - s))


# --------------------------------------------------------------------------- pos_weight


def test_pos_weight_by_hand():
    targets = np.array([
        [1, 0, 1, -1],
        [1, 0, 0, 1],
        [0, 1, 0, 0],
        [1, -1, 0, 0],
    ])
    # Attr1: 3 pos, 1 neg -> 1/3; Attr2: 1 pos, 2 neg (one NA) -> 2; Attr3: 1 pos, 3 neg -> 3;
    # Attr4: 1 pos, 2 neg (one NA) -> 2.
    w = compute_pos_weight(targets)
    assert w.dtype == torch.float32 and w.shape == (4,)
    torch.testing.assert_close(w, torch.tensor([1 / 3, 2.0, 3.0, 2.0]))


def test_pos_weight_on_real_counts():
    # 786 positives, 106 negatives and 84 NA, as in the real data's most common attribute.
    col = np.array([1] * 786 + [0] * 106 + [-1] * 84)
    rare = np.array([1] * 70 + [0] * 820 + [-1] * 86)
    w = compute_pos_weight(np.stack([col, rare], 1))
    assert w[0].item() == pytest.approx(106 / 786)
    assert round(w[0].item(), 4) == 0.1349
    assert w[1].item() == pytest.approx(820 / 70)


def test_na_labels_do_not_count():
    with_na = np.array([[1], [0], [0], [-1], [-1], [-1]])
    without = np.array([[1], [0], [0]])
    assert compute_pos_weight(with_na).item() == compute_pos_weight(without).item() == 2.0


@pytest.mark.parametrize(
    ("column", "kind"),
    [([1, 1, -1], "negatives"), ([0, 0, -1], "positives"), ([-1, -1, -1], "positives")],
    ids=["no negatives", "no positives", "all NA"],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_degenerate_attributes_get_a_finite_weight_and_a_warning(column, kind, as_tensor):
    targets = np.stack([np.array(column), np.array([1, 0, 0])], 1)
    if as_tensor:
        targets = torch.tensor(targets, dtype=torch.float32)
    with pytest.warns(UserWarning, match=f"blue: no known {kind} in the training labels; pos_weight set to 1.0"):
        w = compute_pos_weight(targets, ["blue", "light"])
    assert torch.isfinite(w).all()
    assert w.tolist() == [1.0, 2.0]


def test_no_warning_for_healthy_attributes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_pos_weight(np.array([[1, 0], [0, 1]]))


# --------------------------------------------------------------------------- masked loss


def test_loss_value_by_hand_with_pos_weight():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]])
    targets = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    pos_weight = torch.tensor([0.5, 3.0, 2.0])
    expected = (bce(2.0, 1, 0.5) + bce(-1.0, 0) + bce(-0.3, 0) + bce(1.5, 1, 3.0) + bce(-2.0, 1, 2.0)) / 5
    loss = MaskedBCEWithLogitsLoss(pos_weight)(logits, targets)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_loss_without_pos_weight_equals_plain_bce_when_nothing_is_na():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    targets = (torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    ours = MaskedBCEWithLogitsLoss()(logits, targets)
    torch.testing.assert_close(ours, torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))


def test_mean_is_over_known_entries_only():
    logits = torch.tensor([[1.0, 7.0, -4.0, 0.0]])
    known = torch.tensor([[1.0, -1.0, -1.0, -1.0]])
    assert MaskedBCEWithLogitsLoss()(logits, known).item() == pytest.approx(bce(1.0, 1))  # not divided by 4


@pytest.mark.parametrize("normalization", ["known", "partial"])
def test_na_entries_get_exactly_zero_gradient(normalization):
    logits = torch.tensor([[3.0, -2.0, 0.7], [-1.0, 4.0, -0.2]], requires_grad=True)
    targets = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, -1.0]])
    MaskedBCEWithLogitsLoss(torch.tensor([2.0, 0.5, 1.0]), normalization)(logits, targets).backward()
    na = targets < 0
    assert torch.all(logits.grad[na] == 0)
    assert torch.all(logits.grad[~na] != 0)


@pytest.mark.parametrize("normalization", ["known", "partial"])
def test_na_entries_do_not_change_the_loss(normalization):
    criterion = MaskedBCEWithLogitsLoss(torch.tensor([2.0, 0.5]), normalization)
    targets = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    a = criterion(torch.tensor([[0.3, -50.0], [1.0, 2.0]]), targets)
    b = criterion(torch.tensor([[0.3, 50.0], [1.0, 2.0]]), targets)
    assert a.item() == b.item()


@pytest.mark.parametrize("normalization", ["known", "partial"])
def test_an_all_na_batch_gives_zero_not_nan(normalization):
    logits = torch.randn(3, 4, requires_grad=True)
    loss = MaskedBCEWithLogitsLoss(torch.full((4,), 5.0), normalization)(logits, torch.full((3, 4), -1.0))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_partial_normalization_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]])
    targets = torch.tensor([[1.0, -1.0, -1.0], [0.0, 1.0, 1.0]])
    pos_weight = torch.tensor([0.5, 3.0, 2.0])
    image1 = bce(2.0, 1, 0.5) / 1  # one known label
    image2 = (bce(-0.3, 0) + bce(1.5, 1, 3.0) + bce(-2.0, 1, 2.0)) / 3
    partial = MaskedBCEWithLogitsLoss(pos_weight, "partial")(logits, targets)
    assert partial.item() == pytest.approx((image1 + image2) / 2, rel=1e-6)
    known = MaskedBCEWithLogitsLoss(pos_weight, "known")(logits, targets)
    assert known.item() == pytest.approx((image1 + 3 * image2) / 4, rel=1e-6)


def test_partial_normalization_skips_images_without_known_labels():
    criterion = MaskedBCEWithLogitsLoss(normalization="partial")
    logits = torch.tensor([[0.4, -0.6], [9.0, 9.0]])
    with_empty = criterion(logits, torch.tensor([[1.0, 0.0], [-1.0, -1.0]]))
    alone = criterion(logits[:1], torch.tensor([[1.0, 0.0]]))
    assert with_empty.item() == pytest.approx(alone.item())


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="normalization must be 'known' or 'partial'"):
        MaskedBCEWithLogitsLoss(normalization="mean")


def test_pos_weight_is_a_buffer_that_moves_with_to():
    criterion = MaskedBCEWithLogitsLoss(torch.tensor([1.0, 2.0]))
    assert "pos_weight" in dict(criterion.named_buffers())
    assert "pos_weight" in criterion.state_dict()
    assert list(criterion.parameters()) == []
    moved = criterion.to(torch.float64)
    assert moved.pos_weight.dtype == torch.float64
    meta = criterion.to("meta")
    assert meta.pos_weight.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pos_weight_moves_to_cuda():
    criterion = MaskedBCEWithLogitsLoss(torch.tensor([1.0, 2.0])).to("cuda")
    assert criterion.pos_weight.is_cuda
    loss = criterion(torch.zeros(1, 2, device="cuda"), torch.tensor([[1.0, -1.0]], device="cuda"))
    assert loss.item() == pytest.approx(math.log(2))


def test_bf16_logits_are_scored_in_float32():
    logits = torch.tensor([[2.0, -1.0]], dtype=torch.bfloat16)
    loss = MaskedBCEWithLogitsLoss()(logits, torch.tensor([[1.0, 0.0]]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((bce(2.0, 1) + bce(-1.0, 0)) / 2, rel=1e-3)
