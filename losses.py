"""Segmentation losses on logits. Functions first; each returns a scalar to minimise
(`1 - dice`, never `-dice`)."""
from __future__ import annotations

import torch


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss `1 - (2 sum(p g) + eps) / (sum(p) + sum(g) + eps)`, p = sigmoid(logits).

    logits: (B, 1, D, H, W); target: (B, 1, D, H, W) float in {0, 1}. Computed per sample
    and averaged over the batch, so a small atrium counts as much as a large one. The `eps`
    in the numerator makes a perfect empty prediction score 0 rather than 1.
    """
    assert logits.shape == target.shape, f"logits {tuple(logits.shape)} vs target {tuple(target.shape)}"
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    inter = (probs * target).sum(1)
    dice = (2 * inter + eps) / (probs.sum(1) + target.sum(1) + eps)
    return 1 - dice.mean()


LOSSES = {"Dice": dice_loss}
