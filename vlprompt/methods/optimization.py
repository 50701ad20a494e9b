"""Optimisation of a prompt: CoOp's optimiser recipe and its warm-up + cosine schedules, built over a
learner's parameter groups (a group may run at a multiple of the optimiser's rate).

Two cosine schedules, both after a constant warm-up:

* ``dassl``: the papers' schedule, exactly. Every Dassl-based reference (CoOp, CoCoOp, KgCoOp,
  MaPLe, PromptSRC, both DePTs, MVLPT) wraps ``CosineAnnealingLR(T_max=max_epoch)`` in Dassl's
  ``ConstantWarmupScheduler`` and steps it once per epoch, at the end of the epoch's last batch.
  Epoch ``e`` (from 0) then runs at ``warmup_lr`` while ``e < warmup_epochs``, and afterwards at
  ``lr * (1 + cos(pi * (e - warmup_epochs) / max_epochs)) / 2``: the cosine restarts its count
  after the warm-up but keeps ``max_epochs`` as its length, so it never reaches 0 (10 epochs with
  one warm-up epoch end at 9.5% of the rate). :func:`dassl_epoch_factor`.
* ``cosine``: vlprompt's smooth variant, stepped per optimiser step from the rate down to 0 over
  the steps after the warm-up. :func:`warmup_cosine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LRSchedule", "OptimizerFactory", "dassl_epoch_factor", "default_optimizer", "prompt_optimization",
           "warmup_cosine"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]

LRSchedule = Literal["dassl", "cosine", "constant"]


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


def dassl_epoch_factor(max_epochs: int, warmup_epochs: int, warmup_factor: float) -> Callable[[int], float]:
    """LR multiplier of epoch ``e`` under Dassl's schedule (see the module docstring):
    ``warmup_factor`` for the first ``warmup_epochs`` epochs, then ``(1 + cos(pi * (e -
    warmup_epochs) / max_epochs)) / 2``."""

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_factor
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / max_epochs))

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
    multiplies the optimiser's rate) and its schedule (the module docstring): during the warm-up
    every group runs at ``warmup_lr``, then each follows the cosine from its own rate.
    ``trainer`` gives the trainer (the schedule's length), asked only for a cosine: a module not
    attached to a trainer still builds its constant-rate optimiser."""
    optimizer = optimizer_factory(groups)
    for group in optimizer.param_groups:  # a learner's group at a multiple of the optimiser's rate
        group["lr"] *= group.pop("lr_scale", 1.0)
    if lr_scheduler == "constant":
        return optimizer
    if lr_scheduler not in ("dassl", "cosine"):
        raise ValueError(f"lr_scheduler must be 'dassl', 'cosine' or 'constant', not {lr_scheduler!r}")
    fitting = trainer()
    if lr_scheduler == "dassl":
        epochs = fitting.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError("lr_scheduler 'dassl' is a per-epoch schedule: set trainer.max_epochs")
        schedules = [dassl_epoch_factor(epochs, max(0, warmup_epochs), warmup_lr / group["lr"]) for group in optimizer.param_groups]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedules), "interval": "epoch"}}
    total = max(1, int(fitting.estimated_stepping_batches))
    steps_per_epoch = max(1, total // max(1, fitting.max_epochs or 1))
    warmup = min(total - 1, warmup_epochs * steps_per_epoch)
    schedules = [warmup_cosine(total, warmup, warmup_lr / group["lr"] if warmup else 1.0)
                 for group in optimizer.param_groups]
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedules), "interval": "step"}}
