"""Task masking: which labels belong to which task, so that a classifier scores each image over its
own task's classes (MVLPT: Shen et al., "Multitask Vision-Language Prompt Tuning", WACV 2024).
Single-task classification is one task over every class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlprompt.data.multitask import Task
from vlprompt.methods.metrics import per_class_from_counts

__all__ = ["TaskScorer", "one_task", "task_scores"]


def one_task(classnames: Sequence[str]) -> Task:
    """The single task over ``classnames``."""
    return Task("task", 0, tuple(classnames))


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


class TaskScorer(nn.Module):
    """The tasks of a classifier and the mask that keeps each image's logits to its own task's
    classes (a non-persistent buffer: checkpoints do not hold it)."""

    def __init__(self, classnames: Sequence[str]) -> None:
        super().__init__()
        self.tasks: list[Task] = []
        self.set_tasks([one_task(classnames)], classnames)

    def set_tasks(self, tasks: Sequence[Task], classnames: Sequence[str]) -> None:
        """Which labels belong to which task; they must tile ``classnames``, task after task."""
        tasks = list(tasks)
        names = [n for t in tasks for n in t.classnames]
        if not tasks or any(t.num_classes == 0 for t in tasks):
            raise ValueError("every task needs at least one class")
        if [t.offset for t in tasks] != [sum(u.num_classes for u in tasks[:i]) for i in range(len(tasks))]:
            raise ValueError("task label offsets must follow each other from 0")
        if names != list(classnames):
            raise ValueError(f"the tasks' {len(names)} classes are not the prompt's {len(classnames)}")
        mask = torch.zeros(len(tasks), len(names), dtype=torch.bool)
        for i, task in enumerate(tasks):
            mask[i, task.offset:task.offset + task.num_classes] = True
        if self.tasks:  # where the module was moved to
            mask = mask.to(self.task_mask.device)
        self.tasks = tasks
        self.register_buffer("task_mask", mask, persistent=False)

    @staticmethod
    def task_ids(batch: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """Each image's task (the batch's ``task``; task 0 when the data has no tasks)."""
        task = batch.get("task")
        return task.to(labels.device) if task is not None else torch.zeros_like(labels)

    def own_task_logits(self, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``logits`` with every class outside each image's own task set to -inf."""
        return logits.masked_fill(~self.task_mask[task_ids], float("-inf"))
