"""Dice and IoU on hand-made masks: per image and dataset-wide, empty masks, ignored pixels."""

from __future__ import annotations

import pytest
import torch

from vlprompt.seg import SegmentationScores


def scores(pred, target, ignore=None):
    metric = SegmentationScores()
    metric.update(torch.as_tensor(pred), torch.as_tensor(target), None if ignore is None else torch.as_tensor(ignore))
    return {k: float(v) for k, v in metric.compute().items()}


def test_empty_prediction_of_an_empty_mask_is_perfect():
    z = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert scores(z, z) == {"dice_per_image": 1.0, "iou_per_image": 1.0, "dice_dataset": 1.0, "iou_dataset": 1.0}


def test_full_overlap_and_none():
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    assert scores(full, full)["dice_per_image"] == 1.0 and scores(full, full)["iou_dataset"] == 1.0
    assert scores(~full, full) == {"dice_per_image": 0.0, "iou_per_image": 0.0, "dice_dataset": 0.0, "iou_dataset": 0.0}


def test_half_overlap():
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :, :2] = True  # 8 pixels
    pred = torch.zeros(1, 4, 4, dtype=torch.bool)
    pred[0, :, 1:3] = True  # 8 pixels, 4 shared
    s = scores(pred, target)
    assert s["dice_per_image"] == pytest.approx(2 * 4 / 16) and s["iou_per_image"] == pytest.approx(4 / 12)


def test_per_image_and_dataset_wide_differ_as_defined():
    # Image 0: a large object found exactly; image 1: a one-pixel object missed.
    target = torch.zeros(2, 10, 10, dtype=torch.bool)
    target[0, :8, :8] = True
    target[1, 0, 0] = True
    pred = target.clone()
    pred[1] = False
    s = scores(pred, target)
    assert s["dice_per_image"] == pytest.approx(0.5) and s["iou_per_image"] == pytest.approx(0.5)
    assert s["dice_dataset"] == pytest.approx(2 * 64 / (2 * 64 + 1)) and s["iou_dataset"] == pytest.approx(64 / 65)


def test_ignored_pixels_count_nowhere_and_batches_accumulate():
    target = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    pred = torch.tensor([[[1, 0], [1, 0]]], dtype=torch.bool)
    ignore = torch.tensor([[[0, 1], [1, 0]]], dtype=torch.bool)
    assert scores(pred, target, ignore)["dice_per_image"] == 1.0
    metric = SegmentationScores()
    for _ in range(3):
        metric.update(pred, target)
    assert float(metric.compute()["dice_dataset"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(pred, target[:, :1])
