"""Dice and IoU of binary segmentation, per image and over the whole dataset, exact under DDP.

Two families of numbers are reported in the literature, often without saying which; vlprompt
reports both, named apart:

* **per image** (``dice_per_image``, ``iou_per_image``): the score of each image, averaged over
  images, so a small object counts as much as a large one. An image whose prediction and ground
  truth are both empty scores 1 (nothing to find, nothing found).
* **dataset-wide** (``dice_dataset``, ``iou_dataset``): true/false positives and false negatives
  summed over every pixel of the dataset first, then one score, so large objects dominate.

TuneVLSeg reports per-image Dice next to dataset-wide IoU; vlprompt keeps both of each. Pixels
marked ``ignore`` (VOC's boundary class 255) count nowhere.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["SegmentationScores", "binary_scores"]


def binary_scores(pred: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positives, false positives and false negatives per image (``[B]`` each) of boolean
    masks ``pred`` and ``target`` (``[B, ...]``), leaving out ``ignore``-d pixels."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    keep = torch.ones_like(pred) if ignore is None else ~ignore.bool().flatten(1)
    tp = (pred & target & keep).sum(1)
    fp = (pred & ~target & keep).sum(1)
    fn = (~pred & target & keep).sum(1)
    return tp, fp, fn


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # An empty prediction of an empty target is perfect.
    return torch.where(den > 0, num.double() / den.clamp(min=1).double(), torch.ones_like(den, dtype=torch.double))


class SegmentationScores(Metric):
    """Dice and IoU of binary masks, per image and dataset-wide (see the module docstring).

    ``update(pred, target, ignore=None)`` takes boolean (or 0/1) masks ``[B, ...]``;
    ``compute()`` returns ``{"dice_per_image", "iou_per_image", "dice_dataset", "iou_dataset"}``
    (NaN before any image). Sums are reduced over processes, so DDP gives the one-process numbers.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("dice_sum", "iou_sum"):
            self.add_state(name, default=torch.zeros((), dtype=torch.double), dist_reduce_fx="sum")
        for name in ("images", "tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        tp, fp, fn = binary_scores(pred, target, ignore)
        self.dice_sum += _ratio(2 * tp, 2 * tp + fp + fn).sum()
        self.iou_sum += _ratio(tp, tp + fp + fn).sum()
        self.images += tp.numel()
        self.tp += tp.sum()
        self.fp += fp.sum()
        self.fn += fn.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.images.double()
        nan = torch.tensor(float("nan"), dtype=torch.double)
        return {
            "dice_per_image": self.dice_sum / n if n > 0 else nan,
            "iou_per_image": self.iou_sum / n if n > 0 else nan,
            "dice_dataset": _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn) if n > 0 else nan,
            "iou_dataset": _ratio(self.tp, self.tp + self.fp + self.fn) if n > 0 else nan,
        }
