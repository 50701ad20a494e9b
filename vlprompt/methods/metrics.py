"""Classification metrics that stay exact under DDP and on classes without test images."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from vlprompt.methods.unreadable import (
    UnreadableImages,  # its former home: still importable from here
)

__all__ = ["ClassCounts", "UnreadableImages", "accuracy_from_counts", "per_class_from_counts"]


class ClassCounts(Metric):
    """Correct and total predictions per class, summed over batches and processes.

    Accuracy is ``correct.sum() / total.sum()``; the per-class mean averages only over the classes
    that had images (:func:`per_class_from_counts` gives None for the others), so a class with no test images is reported as such
    instead of being scored 0.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("correct", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.long()
        self.total += torch.bincount(labels, minlength=self.num_classes)[: self.num_classes]
        hits = labels[predictions == labels]
        self.correct += torch.bincount(hits, minlength=self.num_classes)[: self.num_classes]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(correct, total)`` per class, summed over every process."""
        return self.correct, self.total


def accuracy_from_counts(correct: torch.Tensor, total: torch.Tensor) -> float:
    """Share of correct predictions over all images (NaN when there were none)."""
    n = int(total.sum())
    return float(correct.sum()) / n if n else float("nan")


def per_class_from_counts(correct: torch.Tensor, total: torch.Tensor) -> list[float | None]:
    """Accuracy of each class; None for a class without images."""
    return [float(c) / float(t) if t else None for c, t in zip(correct.tolist(), total.tolist())]
