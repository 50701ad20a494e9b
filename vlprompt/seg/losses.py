"""The segmentation loss: Dice + binary cross-entropy on mask logits, as TuneVLSeg trains
(weights 1 and 0.2), computed by MONAI's ``DiceCELoss`` rather than written again here."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DiceBCELoss"]

#: A logit whose sigmoid is 0 in float32: ignored pixels become certain, correct background.
_CERTAIN_BACKGROUND = -1e4


class DiceBCELoss(nn.Module):
    """``lambda_dice * Dice + lambda_bce * BCE`` of mask logits ``[B, 1, H, W]`` against a 0/1
    target of the same shape (MONAI ``DiceCELoss`` with a sigmoid; Dice per image, then averaged).

    Pixels marked ``ignore`` are turned into certain, correct background before the loss, so they
    add nothing to Dice (true negatives do not enter it) and nothing to BCE's sum; BCE's mean
    still divides by every pixel.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 0.2, smooth: float = 1e-5) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_bce, smooth_nr=smooth,
                               smooth_dr=smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
        if logits.shape != target.shape or logits.dim() != 4 or logits.shape[1] != 1:
            raise ValueError(f"expected logits and target of shape [B, 1, H, W], got {tuple(logits.shape)} and "
                             f"{tuple(target.shape)}")
        target = target.float()
        if ignore is not None:
            ignore = ignore.bool()
            logits = logits.masked_fill(ignore, _CERTAIN_BACKGROUND)
            target = target.masked_fill(ignore, 0.0)
        return self.loss(logits.float(), target)
