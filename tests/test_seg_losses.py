"""The Dice + BCE segmentation loss: its definition on a small example, and ignored pixels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("monai")

from vlprompt.seg.losses import DiceBCELoss  # noqa: E402


def test_loss_is_dice_plus_a_fifth_of_bce():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 5, 5)
    target = (torch.rand(3, 1, 5, 5) > 0.5).float()
    p = logits.sigmoid()
    inter = (p * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1e-5) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1e-5)
    expected = dice.mean() + 0.2 * F.binary_cross_entropy_with_logits(logits, target)
    assert DiceBCELoss()(logits, target) == pytest.approx(float(expected), abs=1e-5)


def test_ignored_pixels_get_no_gradient_and_do_not_change_the_loss():
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 6, 6, requires_grad=True)
    target = (torch.rand(2, 1, 6, 6) > 0.5).float()
    ignore = torch.zeros_like(target, dtype=torch.bool)
    ignore[:, :, :2] = True
    loss = DiceBCELoss()(logits, target, ignore)
    loss.backward()
    loss = loss.detach()
    assert torch.all(logits.grad[ignore] == 0) and torch.any(logits.grad[~ignore] != 0)
    other = target.clone()
    other[ignore] = 1 - other[ignore]  # whatever the ignored pixels say
    assert DiceBCELoss()(logits.detach(), other, ignore) == pytest.approx(float(loss), abs=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        DiceBCELoss()(logits[:, 0], target[:, 0])
