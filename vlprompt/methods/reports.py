"""What a classifier measures and logs, per stage: top-1 and per-class accuracy for one task
(:class:`ClassAccuracyReport`, the logged names of ``PromptClassifier``) or each task's own metric
and their mean (:class:`TaskReport`, MVLPT's evaluation; the logged names of
``MultiTaskPromptClassifier``). Both receive predictions already kept to each image's own task."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from vlprompt.data.multitask import Task
from vlprompt.methods.metrics import (
    ClassCounts,
    accuracy_from_counts,
    per_class_from_counts,
)
from vlprompt.methods.tasks import task_scores

__all__ = ["ClassAccuracyReport", "ClassificationReport", "TaskReport"]

log = logging.getLogger(__name__)


class ClassificationReport(nn.Module):
    """Base of the reports: test counts per class, and hooks that do nothing unless a report needs
    them. ``follows_data_at_setup``: whether the classifier follows the data's classes and tasks
    from set-up on (tasks shape the training loss) rather than from evaluation on."""

    follows_data_at_setup = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.test_counts = ClassCounts(num_classes)

    def training_step(self, module: pl.LightningModule, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """After the training loss of a batch is logged."""

    def validation_step(self, module: pl.LightningModule, logits: torch.Tensor, predictions: torch.Tensor,
                        labels: torch.Tensor) -> None:
        raise NotImplementedError

    def on_validation_start(self) -> None:
        """Before validating."""

    def after_sanity_check(self) -> None:
        """At the end of Lightning's sanity check, whose scores are not logged."""

    def validation_epoch_end(self, module: pl.LightningModule, tasks: Sequence[Task]) -> None:
        raise NotImplementedError

    def test_epoch_end(self, module: pl.LightningModule, classnames: Sequence[str], tasks: Sequence[Task]) -> None:
        raise NotImplementedError

    def prediction(self, index: torch.Tensor, logits: torch.Tensor, task_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What ``predict_step`` returns for a batch: each image's class and its probability."""
        confidence, prediction = logits.softmax(-1).max(-1)
        return {"index": index, "prediction": prediction, "confidence": confidence}

    def checkpoint_record(self, tasks: Sequence[Task]) -> dict[str, Any]:
        """Entries added to the checkpoint's ``vlprompt`` record."""
        return {}


class ClassAccuracyReport(ClassificationReport):
    """One task: ``train/acc``, ``val/loss``, ``val/acc`` (top-1) and ``val/acc_per_class_mean``
    (what :class:`~vlprompt.methods.best_validation.BestValidationPrompt` watches for a task scored
    by mean per-class accuracy), and after a test ``test/acc``,
    ``test/acc_per_class_mean`` (over the classes with test images; the module's
    ``per_class_accuracy`` holds each) and ``test/images``. Exact under DDP and for classes without
    test images (:class:`~vlprompt.methods.metrics.ClassCounts`)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        n = max(2, num_classes)  # torchmetrics needs >= 2 classes
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_counts = ClassCounts(num_classes)

    def training_step(self, module: pl.LightningModule, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.train_acc(logits.detach().argmax(-1), labels)
        module.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(labels))

    def validation_step(self, module: pl.LightningModule, logits: torch.Tensor, predictions: torch.Tensor,
                        labels: torch.Tensor) -> None:
        module.log("val/loss", F.cross_entropy(logits, labels), batch_size=len(labels), sync_dist=True)
        self.val_acc(predictions, labels)
        module.log("val/acc", self.val_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(labels))
        self.val_counts.update(predictions, labels)

    def on_validation_start(self) -> None:
        self.val_counts.reset()

    def after_sanity_check(self) -> None:
        self.val_counts.reset()

    def validation_epoch_end(self, module: pl.LightningModule, tasks: Sequence[Task]) -> None:
        """``val/acc`` is logged as a metric object: Lightning computes and resets it."""
        scored = [a for a in per_class_from_counts(*self.val_counts.compute()) if a is not None]
        module.log("val/acc_per_class_mean", sum(scored) / len(scored) if scored else float("nan"), sync_dist=True)
        self.val_counts.reset()

    def test_epoch_end(self, module: pl.LightningModule, classnames: Sequence[str], tasks: Sequence[Task]) -> None:
        correct, total = self.test_counts.compute()
        per_class = per_class_from_counts(correct, total)
        module.per_class_accuracy = dict(zip(classnames, per_class))
        scored = [a for a in per_class if a is not None]
        empty = [n for n, a in zip(classnames, per_class) if a is None]
        if empty:
            log.warning("%d classes had no test images and are left out of the per-class mean: %s",
                        len(empty), ", ".join(empty[:10]))
        module.log("test/acc", accuracy_from_counts(correct, total), sync_dist=True)
        module.log("test/acc_per_class_mean", sum(scored) / len(scored) if scored else float("nan"), sync_dist=True)
        module.log("test/images", float(total.sum()), sync_dist=True)


class TaskReport(ClassificationReport):
    """Several tasks (MVLPT): each task scored with the metric it declares, logged as
    ``<stage>/<task>`` when there are several, and ``<stage>/acc``, the unweighted mean of the tasks'
    scores (the module's ``task_results`` holds each task's after a test). No training metric."""

    follows_data_at_setup = True

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.val_counts = ClassCounts(num_classes)

    def validation_step(self, module: pl.LightningModule, logits: torch.Tensor, predictions: torch.Tensor,
                        labels: torch.Tensor) -> None:
        self.val_counts.update(predictions, labels)

    def on_validation_start(self) -> None:
        self.val_counts.reset()

    def after_sanity_check(self) -> None:
        self.val_counts.reset()

    def validation_epoch_end(self, module: pl.LightningModule, tasks: Sequence[Task]) -> None:
        self._log_task_scores(module, "val", self.val_counts, tasks)

    def test_epoch_end(self, module: pl.LightningModule, classnames: Sequence[str], tasks: Sequence[Task]) -> None:
        module.task_results = self._log_task_scores(module, "test", self.test_counts, tasks)
        missing = [name for name, score in module.task_results.items() if score is None]
        if missing:
            log.warning("tasks without test images, left out of the mean: %s", ", ".join(missing))

    @staticmethod
    def _log_task_scores(module: pl.LightningModule, stage: str, counts: ClassCounts,
                         tasks: Sequence[Task]) -> dict[str, float | None]:
        scores = task_scores(*counts.compute(), tasks)
        scored = [s for s in scores.values() if s is not None]
        for name, score in scores.items():
            if score is not None and len(scores) > 1:
                module.log(f"{stage}/{name}", score, sync_dist=True)
        module.log(f"{stage}/acc", sum(scored) / len(scored) if scored else float("nan"), prog_bar=stage == "val",
                   sync_dist=True)
        counts.reset()
        return scores

    def prediction(self, index: torch.Tensor, logits: torch.Tensor, task_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        confidence, prediction = logits.softmax(-1).max(-1)
        return {"index": index, "task": task_ids, "prediction": prediction, "confidence": confidence}

    def checkpoint_record(self, tasks: Sequence[Task]) -> dict[str, Any]:
        return {"tasks": [{"name": t.name, "num_classes": t.num_classes, "metric": t.metric} for t in tasks]}
