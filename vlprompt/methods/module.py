"""``PromptModule``: what every procedure that trains a prompt on a frozen encoder shares.

The frozen backbone and the prompt learner, its initialisation and saving, the optimiser and
CoOp's warm-up + cosine schedule (:mod:`~vlprompt.methods.optimization`), checkpoints that hold
what was learned only, with the random state so that an interrupted fit resumes exactly
(:mod:`~vlprompt.methods.checkpoints`, :class:`~vlprompt.methods.random_state.RandomStateCheckpoint`),
unreadable-image accounting (:mod:`~vlprompt.methods.unreadable`) and seeded training data
(:class:`~vlprompt.data.protocol.SeededDataset`). It has no loss, no metrics and no data protocol
of its own: :class:`~vlprompt.methods.PromptClassifier` (classification, one task or several) and
:class:`~vlprompt.methods.PromptSegmenter` add those, and name the dataset each stage reads
(:meth:`PromptModule.stage_dataset`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from vlprompt.backbones import Backbone
from vlprompt.data.protocol import SeededDataset, TrainBatches
from vlprompt.methods.checkpoints import (
    check_record,
    prompt_record,
    restore_frozen,
    strip_frozen,
)
from vlprompt.methods.data_link import attached_data, fingerprint_of
from vlprompt.methods.optimization import (
    LRSchedule,
    OptimizerFactory,
    default_optimizer,
    prompt_optimization,
    warmup_cosine,
)
from vlprompt.methods.prompt_init import load_initial_prompt
from vlprompt.methods.random_state import RandomStateCheckpoint
from vlprompt.methods.scoring import prompt_logits
from vlprompt.methods.unreadable import UnreadableImages, log_unreadable
from vlprompt.prompts import (
    PromptLearner,
    PromptLearnerFactory,
    PromptOutput,
    ZeroShotPrompt,
)
from vlprompt.prompts.io import save_prompt

__all__ = ["OptimizerFactory", "PromptModule", "default_optimizer", "warmup_cosine"]

log = logging.getLogger(__name__)


class PromptModule(pl.LightningModule):
    """Base of the prompt-training LightningModules (see the module docstring).

    Args:
        backbone: the frozen encoder.
        prompt_learner: a factory ``(backbone, names) -> PromptLearner``; zero-shot CLIP when None.
        names: what the learner is first built for (class names; a segmenter's first prompt).
        optimizer: factory over the learnable parameters (CoOp's SGD by default).
        lr_scheduler: ``dassl`` (the papers' per-epoch cosine, exactly), ``cosine`` (per step, down
            to 0) or ``constant``; both cosines follow a constant warm-up
            (:mod:`~vlprompt.methods.optimization`).
        warmup_epochs, warmup_lr: epochs of constant warm-up learning rate, and that rate (of every
            parameter group).
        drop_last: ask the data module to drop its last incomplete training batch, as Dassl's loader
            does (:class:`~vlprompt.data.protocol.TrainBatches`; the paper recipes set it).
        init_prompt: a saved vlprompt prompt directory or a Dassl checkpoint to start from.
    """

    #: Constructor arguments that are objects, not settings: kept out of saved hyper-parameters.
    _not_hyperparameters: tuple[str, ...] = ("backbone", "prompt_learner", "optimizer")

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory | None,
        names: list[str],
        *,
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: LRSchedule = "cosine",
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        drop_last: bool = False,
        init_prompt: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        factory = prompt_learner or ZeroShotPrompt
        self.prompt_learner: PromptLearner = factory(backbone, list(names))
        self.optimizer_factory = optimizer
        self.lr_scheduler_name = lr_scheduler
        self.warmup_epochs, self.warmup_lr = warmup_epochs, warmup_lr
        self.drop_last = drop_last
        self.unreadable = UnreadableImages()
        if init_prompt:
            load_initial_prompt(self.prompt_learner, init_prompt)

    def load_initial_prompt(self, path: str | Path) -> None:
        """Start from a saved vlprompt prompt (directory) or a Dassl checkpoint (file)."""
        load_initial_prompt(self.prompt_learner, path)

    def save_prompt(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Save the learned prompt (``config.json`` + ``prompt.safetensors``)."""
        return save_prompt(self.prompt_learner, directory, overwrite=overwrite)

    def logits(self, output: PromptOutput) -> torch.Tensor:
        """Class logits of a prompt learner's output (:func:`~vlprompt.methods.scoring.prompt_logits`)."""
        return prompt_logits(output, self.backbone)

    # -- the data each stage reads ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Hand the training-loader options over to the data module (renewed at every fit)."""
        if stage != "fit":
            return
        dm = attached_data(self)
        if isinstance(dm, TrainBatches):
            dm.request_drop_last(self.drop_last)
        elif self.drop_last:
            log.warning("%s cannot drop its last incomplete training batch (drop_last=True is ignored): "
                        "it does not implement vlprompt.data.protocol.TrainBatches", type(dm).__name__)

    def stage_dataset(self, stage: str) -> Any:
        """The dataset ``stage`` reads (``train``/``val``/``test``/``predict``), None when unknown."""
        return None

    def _fingerprint(self, stage: str) -> str:
        return fingerprint_of(self.stage_dataset(stage))

    def on_train_epoch_start(self) -> None:
        dataset = self.stage_dataset("train")
        if isinstance(dataset, SeededDataset):
            dataset.set_epoch(self.current_epoch)  # seeded draws: those of this epoch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        train = self.stage_dataset("train") if isinstance(batch, dict) and "epoch" in batch else None
        if isinstance(train, SeededDataset):
            stale = train.remake_stale(batch, self.current_epoch)
            if stale:
                log.debug("remade %d items drawn before epoch %d began", stale, self.current_epoch)

    # -- unreadable images and a broken loss ------------------------------------------------------
    def _count_unreadable(self, batch: dict[str, Any], stage: str) -> None:
        skipped = batch.get("skipped")
        if skipped:
            self.unreadable.add(stage, self._fingerprint(stage), skipped)

    def _log_unreadable(self, stage: str) -> None:
        log_unreadable(self, self.unreadable, stage)

    def on_train_epoch_end(self) -> None:
        self._log_unreadable("train")

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "stopping. Lower the learning rate or check the data; the last good checkpoint is kept."
            )

    # -- optimisation ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates: the prompt's learnable tensors (a head too, in subclasses)."""
        return [p for p in self.prompt_learner.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError(f"the {self.prompt_learner.name} prompt has no learnable parameters; nothing to fit")
        return prompt_optimization(self.optimizer_factory, self.prompt_learner.optimizer_groups(params), lambda: self.trainer,
                                   lr_scheduler=self.lr_scheduler_name, warmup_epochs=self.warmup_epochs,
                                   warmup_lr=self.warmup_lr)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [RandomStateCheckpoint()]

    # -- checkpoints hold the prompt only -------------------------------------------------------------
    def frozen_modules(self) -> tuple[str, ...]:
        """Submodules that are not learned here: checkpoints leave them out and take them from the
        module being loaded into (the frozen encoder; a frozen head in subclasses)."""
        return ("backbone",)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        strip_frozen(checkpoint, self.frozen_modules())
        checkpoint["vlprompt"] = prompt_record(self.backbone, self.prompt_learner)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_record(checkpoint, self.backbone, self.prompt_learner)
        # Frozen modules are not in the checkpoint; keep the ones we were built with.
        restore_frozen(checkpoint, self, self.frozen_modules())
