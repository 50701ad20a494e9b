"""Optimisation of a prompt: CoOp's optimiser recipe and its warm-up + cosine schedule, built over a
learner's parameter groups (a group may run at a multiple of the optimiser's rate)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LRSchedule", "OptimizerFactory", "default_optimizer", "prompt_optimization", "warmup_cosine"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]

LRSchedule = Literal["cosine", "constant"]


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> Optimizer:
    """CoOp's recipe: SGD, lr 0.002, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)


def warmup_cosine(total_steps: int, warmup_steps: int, warmup_factor: float) -> Callable[[int], float]:
    """LR multiplier: constant ``warmup_factor`` for ``warmup_steps`` (CoOp's constant warm-up),
    then cosine from 1 to 0 over the remaining steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_factor
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def prompt_optimization(
    optimizer_factory: OptimizerFactory,
    groups: Iterable[Any],
    trainer: Callable[[], pl.Trainer],
    *,
    lr_scheduler: LRSchedule = "cosine",
    warmup_epochs: int = 1,
    warmup_lr: float = 1e-5,
) -> Optimizer | dict[str, Any]:
    """What ``configure_optimizers`` returns: the optimiser over ``groups`` (a group's ``lr_scale``
    multiplies the optimiser's rate) and, for ``cosine``, Dassl's schedule stepped per batch: every
    group at ``warmup_lr`` for ``warmup_epochs``, then each on a cosine from its own rate to 0.
    ``trainer`` gives the trainer (the schedule's length), asked only for ``cosine``: a module not
    attached to a trainer still builds its constant-rate optimiser."""
    optimizer = optimizer_factory(groups)
    for group in optimizer.param_groups:  # a learner's group at a multiple of the optimiser's rate
        group["lr"] *= group.pop("lr_scale", 1.0)
    if lr_scheduler == "constant":
        return optimizer
    fitting = trainer()
    total = max(1, int(fitting.estimated_stepping_batches))
    steps_per_epoch = max(1, total // max(1, fitting.max_epochs or 1))
    warmup = min(total - 1, warmup_epochs * steps_per_epoch)
    schedules = [warmup_cosine(total, warmup, warmup_lr / group["lr"] if warmup else 1.0)
                 for group in optimizer.param_groups]
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedules), "interval": "step"}}
