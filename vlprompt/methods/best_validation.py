"""Keep the prompt of the epoch with the best validation score (Dassl's ``TEST.FINAL_MODEL
best_val``, which MVLPT's scripts use: Shen et al., "Multitask Vision-Language Prompt Tuning",
WACV 2024) as a Lightning callback."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["BestValidationPrompt"]

log = logging.getLogger(__name__)


class BestValidationPrompt(pl.Callback):
    """After every validation of a fit, copy what was learned when ``monitor`` is strictly higher
    than every score before; when training ends, put the best copy back, so that what is tested
    and saved after ``fit`` is the best-validation prompt.

    As Dassl's ``TrainerX.after_epoch`` with ``TEST.FINAL_MODEL best_val``: the model is validated
    after every epoch (give the trainer validation data and ``check_val_every_n_epoch=1``), the
    best score starts at minus infinity and a tie keeps the earlier epoch; after training Dassl
    loads ``model-best.pth.tar`` and tests it. What is copied is the module's state without its
    frozen parts (``frozen_modules()``, the encoder): the prompt (and a learned head). The copies
    stay in memory on the module's device; they are callback state, so an interrupted fit resumes
    with them. A score that is not a number (no validation images) is never the best; when no
    epoch was ever the best, the last prompt is kept, with a warning.

    Args:
        monitor: the logged validation score (``val/acc``: top-1 accuracy, or for
            :class:`~vlprompt.methods.MultiTaskPromptClassifier` the mean of the tasks' own
            metrics; ``val/acc_per_class_mean`` for a single task scored by mean per-class
            accuracy).
    """

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self.best_score = -math.inf
        self.best_epoch: int | None = None
        #: every validation's score, in order
        self.scores: list[float] = []
        self._best_state: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _learned_state(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        frozen = getattr(pl_module, "frozen_modules", lambda: ("backbone",))()
        prefixes = tuple(f"{name}." for name in frozen)
        return {k: v.detach().clone() for k, v in pl_module.state_dict().items() if not k.startswith(prefixes)}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"BestValidationPrompt: {self.monitor!r} was not logged in validation (logged: "
                           f"{sorted(k for k in trainer.callback_metrics if k.startswith('val'))}); give the "
                           "trainer validation data")
        score = float(trainer.callback_metrics[self.monitor])
        self.scores.append(score)
        if score > self.best_score:  # strictly: a tie keeps the earlier epoch, as Dassl
            self.best_score, self.best_epoch = score, trainer.current_epoch
            self._best_state = self._learned_state(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._best_state is None:
            log.warning("BestValidationPrompt: no validation score of %r was ever the best (scores %s); "
                        "keeping the last prompt", self.monitor, self.scores)
            return
        unexpected = pl_module.load_state_dict(self._best_state, strict=False).unexpected_keys
        if unexpected:  # the frozen parts are missing on purpose; nothing else may be
            raise RuntimeError(f"BestValidationPrompt: the best state does not fit the module: {unexpected}")
        log.info("kept the prompt of epoch %d, the best %s (%.4f) of %d validations", self.best_epoch,
                 self.monitor, self.best_score, len(self.scores))

    def state_dict(self) -> dict[str, Any]:
        state = self._best_state
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "scores": list(self.scores),
                "best_state": {k: v.cpu() for k, v in state.items()} if state is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = float(state_dict.get("best_score", -math.inf))
        self.best_epoch = state_dict.get("best_epoch")
        self.scores = list(state_dict.get("scores", []))
        self._best_state = state_dict.get("best_state")
