"""Class-imbalance weights and the NA-masked BCE loss."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def compute_pos_weight(targets: np.ndarray | torch.Tensor, attributes: Sequence[str] | None = None) -> torch.Tensor:
    """Per-attribute ``negatives / positives``, counted over known labels only.

    An attribute with no known positives or no known negatives gets weight 1.0 and a warning,
    never inf or NaN.

    Args:
        targets: (N, n_attributes) with 1, 0 and -1 (NA).
        attributes: names used in warnings.
    Returns:
        A float32 tensor of shape (n_attributes,).
    """
    t = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    pos = (t == 1).sum(0).double()
    neg = (t == 0).sum(0).double()
    weight = torch.ones_like(pos)
    ok = (pos > 0) & (neg > 0)
    weight[ok] = neg[ok] / pos[ok]
    for j in torch.nonzero(~ok).flatten().tolist():
        name = attributes[j] if attributes else f"attribute {j + 1}"
        kind = "positives" if pos[j] == 0 else "negatives"
        warnings.warn(f"{name}: no known {kind} in the training labels; pos_weight set to 1.0", stacklevel=2)
    return weight.float()


class MaskedBCEWithLogitsLoss(nn.Module):
    """``BCEWithLogitsLoss`` with ``pos_weight`` that ignores NA targets (encoded as -1).

    Args:
        pos_weight: (n_attributes,) weights for positives, stored as a buffer so ``.to()`` moves it.
        normalization: ``"known"`` averages over the known entries of the batch (the default);
            ``"partial"`` is the partial-BCE normalisation of Durand et al. (CVPR 2019) with
            g(p) = 1/p: each image's loss is averaged over its own known labels, then over images.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, normalization: str = "known"):
        super().__init__()
        if normalization not in ("known", "partial"):
            raise ValueError(f"normalization must be 'known' or 'partial', got {normalization!r}")
        self.normalization = normalization
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32))

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        """What ``forward`` divides the summed loss by, before clamping to 1: the number of known
        labels (``"known"``) or of images with a known label (``"partial"``)."""
        known = targets >= 0
        return known.sum() if self.normalization == "known" else known.any(1).sum()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Masked mean loss; 0 (not NaN) when every target is NA.

        Args:
            logits: (B, n_attributes).
            targets: (B, n_attributes) with 1, 0 or -1 (NA).
        """
        mask = (targets >= 0).to(logits.dtype)
        per_entry = F.binary_cross_entropy_with_logits(
            logits.float(), targets.clamp(min=0).float(), pos_weight=self.pos_weight, reduction="none"
        ) * mask  # (B, n_attributes); NA entries are exactly 0 and pass no gradient
        if self.normalization == "known":
            return per_entry.sum() / mask.sum().clamp(min=1)
        known_per_image = mask.sum(1)  # (B,)
        per_image = per_entry.sum(1) / known_per_image.clamp(min=1)  # mean over the image's known labels
        return per_image.sum() / (known_per_image > 0).sum().clamp(min=1)


def masked_vs_plain_loss(logits: torch.Tensor, targets: torch.Tensor,
                         pos_weight: torch.Tensor | None = None) -> dict[str, float]:
    """The masked loss training minimises next to plain BCE, which reads every NA label as a 0.

    Both weight positives by ``pos_weight``, so they differ only in what NA labels count for.

    Args:
        logits: (B, n_attributes).
        targets: (B, n_attributes) with 1, 0 or -1 (NA).
        pos_weight: (n_attributes,) weights for positives, or None.
    Returns:
        ``masked`` (``MaskedBCEWithLogitsLoss``: the mean over known labels), ``plain`` (the mean over
        every label, NA as 0) and ``na_share`` (the share of labels that are NA).
    """
    masked = MaskedBCEWithLogitsLoss(pos_weight)(logits, targets)
    plain = F.binary_cross_entropy_with_logits(logits.float(), targets.clamp(min=0).float(), pos_weight=pos_weight)
    return {"masked": masked.item(), "plain": plain.item(), "na_share": (targets < 0).float().mean().item()}
