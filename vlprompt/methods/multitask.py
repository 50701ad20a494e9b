"""``MultiTaskPromptClassifier``: one prompt tuned on several classification tasks at once
(MVLPT: Shen et al., "Multitask Vision-Language Prompt Tuning", WACV 2024).

Generic over prompt learners: any learner that works with :class:`~vlprompt.methods.PromptClassifier`
(CoOp, VPT, UPT, MaPLe, ...) is tuned over the union of all tasks' classes, the learned tensors
shared by every task.

Where vlprompt differs from the reference code, on purpose:

* ``loss="task"`` excludes the other tasks' classes from the softmax (their logits are -inf).
  The reference's per-task option multiplies them by 0, which leaves ``exp(0)`` terms in the
  denominator. ``loss="union"`` (the default) is the reference's plain cross-entropy over the
  union of classes.
* Evaluation takes each image's argmax over its own task's classes, as the reference does, and
  scores each task with the metric it declares (top-1 or mean per-class accuracy); the task mean
  is the unweighted mean of the tasks' scores. Tasks are met through
  :class:`~vlprompt.data.multitask.MultiTaskDataModule`; a single-task data module is one task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vlprompt.backbones import Backbone
from vlprompt.data.multitask import Task
from vlprompt.methods.metrics import ClassCounts, per_class_from_counts
from vlprompt.methods.module import OptimizerFactory, PromptModule, default_optimizer
from vlprompt.prompts import PromptLearnerFactory

__all__ = ["MultiTaskPromptClassifier", "task_scores"]

log = logging.getLogger(__name__)

MultiTaskLoss = Literal["union", "task"]


def task_scores(correct: torch.Tensor, total: torch.Tensor, tasks: Sequence[Task]) -> dict[str, float | None]:
    """Each task's score from per-class counts over the union of classes: top-1 accuracy
    (``accuracy``) or the mean of its classes' accuracies (``mean_per_class``, classes without
    images left out); None for a task without images."""
    scores: dict[str, float | None] = {}
    for task in tasks:
        c, t = correct[task.offset:task.offset + task.num_classes], total[task.offset:task.offset + task.num_classes]
        if int(t.sum()) == 0:
            scores[task.name] = None
        elif task.metric == "mean_per_class":
            per_class = [a for a in per_class_from_counts(c, t) if a is not None]
            scores[task.name] = sum(per_class) / len(per_class)
        else:
            scores[task.name] = float(c.sum()) / float(t.sum())
    return scores


class MultiTaskPromptClassifier(PromptModule):
    """Tune one prompt on several tasks (MVLPT; see the module docstring).

    Args:
        backbone: the frozen encoder.
        prompt_learner: factory ``(backbone, classnames) -> PromptLearner`` (MCoOp, MVPT, MUPT: the
            ``configs/methods/mvlpt_*.yaml`` recipes).
        classnames: the union of all tasks' class names, task after task (linked from the data).
        loss: ``union`` (cross-entropy over every task's classes, as MVLPT) or ``task`` (over the
            sample's own task's classes only).
        label_smoothing: cross-entropy label smoothing.
        Other arguments as for :class:`~vlprompt.methods.module.PromptModule`.

    After ``trainer.test``, :attr:`task_results` holds each task's score; the logged metrics are
    ``test/<task>`` per task and ``test/acc``, their mean (``val/acc`` likewise).
    """

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory | None = None,
        classnames: list[str] | None = None,
        *,
        loss: MultiTaskLoss = "union",
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        cache_image_features: bool = True,
        cache_augmented_train: bool = False,
        init_prompt: str | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if not classnames:
            raise ValueError("MultiTaskPromptClassifier needs the class names of all tasks (classnames=[...])")
        if loss not in ("union", "task"):
            raise ValueError(f"loss must be union or task, not {loss!r}")
        super().__init__(backbone, prompt_learner, classnames, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, cache_image_features=cache_image_features,
                         cache_augmented_train=cache_augmented_train, init_prompt=init_prompt)
        self.save_hyperparameters(ignore=list(self._not_hyperparameters))
        self.loss_mode = loss
        self.label_smoothing = label_smoothing
        #: Each task's score in the last test (None for a task without test images).
        self.task_results: dict[str, float | None] = {}
        self.set_tasks([Task("task", 0, tuple(self.prompt_learner.classnames))])

    # -- tasks -------------------------------------------------------------------------------------
    def set_tasks(self, tasks: Sequence[Task]) -> None:
        """Which labels belong to which task (they must tile the learner's classes)."""
        tasks = list(tasks)
        names = [n for t in tasks for n in t.classnames]
        if not tasks or any(t.num_classes == 0 for t in tasks):
            raise ValueError("every task needs at least one class")
        if [t.offset for t in tasks] != [sum(u.num_classes for u in tasks[:i]) for i in range(len(tasks))]:
            raise ValueError("task label offsets must follow each other from 0")
        if names != list(self.prompt_learner.classnames):
            raise ValueError(f"the tasks' {len(names)} classes are not the prompt's {self.prompt_learner.num_classes}")
        self.tasks = tasks
        mask = torch.zeros(len(tasks), len(names), dtype=torch.bool)
        for i, task in enumerate(tasks):
            mask[i, task.offset:task.offset + task.num_classes] = True
        self.register_buffer("task_mask", mask.to(self.device), persistent=False)
        self._reset_metrics()

    def _reset_metrics(self) -> None:
        self.val_counts = ClassCounts(self.prompt_learner.num_classes)
        self.test_counts = ClassCounts(self.prompt_learner.num_classes)
        self._metric_attributes = None  # Lightning caches which attribute holds which metric

    def _sync_with_data(self) -> None:
        """Follow the data module's classes and tasks (e.g. target tasks after source training)."""
        dm = self.classification_data()
        if dm is None:
            return
        names = list(dm.classnames)
        if names != self.prompt_learner.classnames:
            log.info("data has %d classes; re-pointing the prompt at them", len(names))
            self.prompt_learner.set_classnames(names)
            self.hparams["classnames"] = list(self.prompt_learner.classnames)
        self.set_tasks(getattr(dm, "tasks", None) or [Task("task", 0, tuple(self.prompt_learner.classnames))])
        self.to(self.device)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._sync_with_data()

    # -- steps -----------------------------------------------------------------------------------
    def _task_ids(self, batch: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        task = batch.get("task")
        return task.to(labels.device) if task is not None else torch.zeros_like(labels)

    def own_task_logits(self, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``logits`` with every class outside each image's own task set to -inf."""
        return logits.masked_fill(~self.task_mask[task_ids], float("-inf"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        output, logits, labels = self._step(batch, "train")
        if logits is None:
            return None
        scored = self.own_task_logits(logits, self._task_ids(batch, labels)) if self.loss_mode == "task" else logits
        ce = F.cross_entropy(scored, labels, label_smoothing=self.label_smoothing)
        loss = self.prompt_learner.classification_weight * ce
        # The learner's own regulariser (KgCoOp, PromptSRC) sees every class's logit: -inf
        # entries would make its distances infinite.
        extra = self.prompt_learner.extra_loss(output, logits, labels)
        if extra is not None:
            self.log("train/extra_loss", extra.detach())
            loss = loss + extra
        self._check_finite(loss)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(labels))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str, counts: ClassCounts) -> None:
        _, logits, labels = self._step(batch, stage)
        if logits is not None:
            counts.update(self.own_task_logits(logits, self._task_ids(batch, labels)).argmax(-1), labels)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", self.val_counts)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test", self.test_counts)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor] | None:
        _, logits, labels = self._step(batch, "predict")
        if logits is None:
            return None
        task_ids = self._task_ids(batch, labels)
        confidence, prediction = self.own_task_logits(logits, task_ids).softmax(-1).max(-1)
        return {"index": batch["index"], "task": task_ids, "prediction": prediction, "confidence": confidence}

    # -- metrics -------------------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate":
            self._sync_with_data()
        self.val_counts.reset()

    def on_test_start(self) -> None:
        self._sync_with_data()
        self.test_counts.reset()

    def on_predict_start(self) -> None:
        self._sync_with_data()

    def _log_task_scores(self, stage: str, counts: ClassCounts) -> dict[str, float | None]:
        scores = task_scores(*counts.compute(), self.tasks)
        scored = [s for s in scores.values() if s is not None]
        for name, score in scores.items():
            if score is not None and len(scores) > 1:
                self.log(f"{stage}/{name}", score, sync_dist=True)
        self.log(f"{stage}/acc", sum(scored) / len(scored) if scored else float("nan"), prog_bar=stage == "val",
                 sync_dist=True)
        counts.reset()
        return scores

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.val_counts.reset()
            return
        self._log_task_scores("val", self.val_counts)
        self._log_unreadable("val")

    def on_test_epoch_end(self) -> None:
        self.task_results = self._log_task_scores("test", self.test_counts)
        missing = [name for name, score in self.task_results.items() if score is None]
        if missing:
            log.warning("tasks without test images, left out of the mean: %s", ", ".join(missing))
        self._log_unreadable("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vlprompt"]["tasks"] = [
            {"name": t.name, "num_classes": t.num_classes, "metric": t.metric} for t in self.tasks]
