"""``PromptModule``: what every procedure that trains a prompt on a frozen encoder shares.

The frozen backbone and the prompt learner, the optimiser and CoOp's warm-up + cosine schedule,
cached image features by dataset, unreadable-image counting, checkpoints that hold the prompt only
(with the random state, so an interrupted fit resumes exactly), saving the prompt, and meeting
the data module through :class:`~vlprompt.data.protocol.ClassificationData`. It has no loss and no
metrics: :class:`~vlprompt.methods.PromptClassifier` (one task) and
:class:`~vlprompt.methods.MultiTaskPromptClassifier` (several tasks, MVLPT) add those.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vlprompt.backbones import Backbone, check_backbone_identity
from vlprompt.data.protocol import ClassificationData
from vlprompt.data.images import ImageDataset
from vlprompt.methods.feature_bank import FeatureBank
from vlprompt.methods.features import ImageFeatureCache
from vlprompt.methods.metrics import UnreadableImages
from vlprompt.methods.prompt_init import load_initial_prompt
from vlprompt.methods.random_state import RandomStateCheckpoint
from vlprompt.methods.scoring import prompt_logits
from vlprompt.prompts import PromptLearner, PromptLearnerFactory, PromptOutput, ZeroShotPrompt
from vlprompt.prompts.io import save_prompt

__all__ = ["OptimizerFactory", "PromptModule", "warmup_cosine"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]

#: The data split each stage reads.
SPLIT_OF_STAGE = {"train": "train", "val": "val", "test": "test", "predict": "test"}


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


class PromptModule(pl.LightningModule):
    """Base of the prompt-training LightningModules (see the module docstring).

    Args:
        backbone: the frozen encoder.
        prompt_learner: a factory ``(backbone, classnames) -> PromptLearner``; zero-shot CLIP when None.
        classnames: class names by label.
        optimizer: factory over the learnable parameters (CoOp's SGD by default).
        lr_scheduler: ``cosine`` (with warm-up) or ``constant``.
        warmup_epochs, warmup_lr: epochs of constant warm-up learning rate, and that rate (of every
            parameter group).
        cache_image_features, cache_augmented_train: see :meth:`_cacheable`.
        init_prompt: a saved vlprompt prompt directory or a Dassl checkpoint to start from.
        feature_bank: a folder where the image features of augmented training views are stored and
            reused (:class:`~vlprompt.methods.feature_bank.FeatureBank`), for learners that leave the
            image tower untouched: each epoch's views are encoded once, in large no-grad batches,
            before the epoch, and shared by every run that sees the same images (methods, shot
            counts, few-shot draws). Needs the data module's ``augment_seed``. Same features as
            without it in fp32, to float32 rounding (the bank encodes in other batch shapes).
        feature_bank_dtype: ``float32`` or ``float16`` storage.
    """

    #: Constructor arguments that are objects, not settings: kept out of saved hyper-parameters.
    _not_hyperparameters: tuple[str, ...] = ("backbone", "prompt_learner", "optimizer")

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory | None,
        classnames: list[str],
        *,
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        cache_image_features: bool = True,
        cache_augmented_train: bool = False,
        init_prompt: str | None = None,
        feature_bank: str | None = None,
        feature_bank_dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        factory = prompt_learner or ZeroShotPrompt
        self.prompt_learner: PromptLearner = factory(backbone, list(classnames))
        self.optimizer_factory = optimizer
        self.lr_scheduler_name = lr_scheduler
        self.warmup_epochs, self.warmup_lr = warmup_epochs, warmup_lr
        self.cache_image_features = cache_image_features
        self.cache_augmented_train = cache_augmented_train
        self.feature_cache = ImageFeatureCache()
        self.feature_bank = (
            FeatureBank(feature_bank, backbone.identity, dtype=feature_bank_dtype) if feature_bank else None
        )
        self.unreadable = UnreadableImages()
        if init_prompt:
            load_initial_prompt(self.prompt_learner, init_prompt)

    def load_initial_prompt(self, path: str | Path) -> None:
        """Start from a saved vlprompt prompt (directory) or a Dassl checkpoint (file)."""
        load_initial_prompt(self.prompt_learner, path)

    def save_prompt(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Save the learned prompt (``config.json`` + ``prompt.safetensors``)."""
        return save_prompt(self.prompt_learner, directory, overwrite=overwrite)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``[B, C]``."""
        return self.logits(self.prompt_learner(images=images, image_features=image_features))

    def logits(self, output: PromptOutput) -> torch.Tensor:
        """Class logits of a prompt learner's output (:func:`~vlprompt.methods.scoring.prompt_logits`)."""
        return prompt_logits(output, self.backbone)

    # -- the data module, met through its protocol ------------------------------------------------
    def classification_data(self) -> ClassificationData | None:
        """The trainer's data module when it implements :class:`ClassificationData`; None when
        there is none or it does not (then the model cannot hand over its preprocessing, and says so)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return None
        if not isinstance(dm, ClassificationData):
            warnings.warn(
                f"{type(dm).__name__} does not implement vlprompt.data.ClassificationData; the backbone's "
                "preprocessing is not handed to it, class names are not followed and image features are not cached",
                stacklevel=2,
            )
            return None
        return dm

    def _fingerprint(self, stage: str) -> str:
        dm = self.classification_data()
        dataset = dm.dataset(SPLIT_OF_STAGE[stage]) if dm is not None else None
        return dataset.fingerprint if dataset is not None else ""

    def setup(self, stage: str) -> None:
        dm = self.classification_data()
        if dm is not None:
            dm.set_preprocess(self.backbone.preprocess_cfg)
        if stage != "fit":
            return
        banked = self._banked_train_data()
        if banked is not None:
            self.feature_bank.folder(banked, 0)  # a set-up the bank cannot serve fails before training
            # Filling decodes and augments every view: with the training loader's workers.
            self.feature_bank.num_workers = int(getattr(dm, "num_workers", 0))
        # With a feature bank the training loader need not decode and augment images. Set for the
        # whole fit, before Lightning first starts the training loader (``estimated_stepping_batches``
        # in ``configure_optimizers`` already does): loader workers read the mode per item, so a
        # switch while they fetch would mix images and empty placeholders in one batch.
        train = self._train_dataset()
        if train is not None and hasattr(train, "set_labels_only"):
            train.set_labels_only(banked is not None)

    # -- image features ----------------------------------------------------------------------------
    def _cacheable(self, stage: str) -> bool:
        """Whether image features of ``stage`` may come from the cache: the learner must leave the
        image tower untouched, and in training the data must not be randomly augmented (unless
        ``cache_augmented_train``: then the first augmented view of each image is reused)."""
        if not self.cache_image_features or self.prompt_learner.uses_image_tower:
            return False
        dm = self.classification_data()
        if dm is None:
            return False
        return stage != "train" or self.cache_augmented_train or not dm.train_augmentation

    def _banked_train_data(self) -> ImageDataset | None:
        """The augmented training dataset whose views come from the feature bank, or None."""
        if self.feature_bank is None or self.prompt_learner.uses_image_tower:
            return None
        dm = self.classification_data()
        if dm is None or not dm.train_augmentation:
            return None
        return dm.dataset("train")

    def _train_dataset(self) -> Any:
        """The training split's dataset, None without one."""
        dm = self.classification_data()
        return dm.dataset("train") if dm is not None else None

    def on_train_epoch_start(self) -> None:
        dataset = self._train_dataset()
        if dataset is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)  # seeded draws: those of this epoch
        banked = self._banked_train_data()
        if banked is not None:
            self.feature_bank.fill(banked, self.current_epoch, self.prompt_learner.encode_images, self.device,
                                   rank=self.global_rank, world_size=self.trainer.world_size,
                                   barrier=self.trainer.strategy.barrier)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        train = self._train_dataset() if isinstance(batch, dict) and "epoch" in batch else None
        if train is not None and hasattr(train, "remake_stale"):
            stale = train.remake_stale(batch, self.current_epoch)
            if stale:
                log.debug("remade %d items drawn before epoch %d began", stale, self.current_epoch)

    def on_fit_end(self) -> None:
        banked = self._banked_train_data()
        if banked is not None:
            banked.set_labels_only(False)
            log.info("feature bank %s: this run encoded %d augmented views, the rest were stored",
                     self.feature_bank.root, self.feature_bank.encoded)

    def _image_features(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        """Cached image features of the batch when the learner and the data allow it, else None."""
        if stage == "train" and "index" in batch:
            banked = self._banked_train_data()
            if banked is not None:
                return self.feature_bank.features(banked, self.current_epoch, batch["index"]).to(self.device)
        if "index" not in batch or not self._cacheable(stage):
            return None
        fingerprint = self._fingerprint(stage)
        if not fingerprint:
            return None
        return self.feature_cache.features(fingerprint, batch["index"], batch["image"], self.prompt_learner.encode_images)

    def _skip_banked_unreadable(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A training batch read without images (feature bank) lists its unreadable images, which
        the bank found, as skipped, the way the loader does when it reads them."""
        banked = self._banked_train_data()
        if banked is None or batch.get("index") is None or not self.feature_bank.unreadable:
            return batch
        indices = batch["index"].tolist()
        keep = [j for j, i in enumerate(indices) if i not in self.feature_bank.unreadable]
        if len(keep) == len(indices):
            return batch
        skipped = list(batch.get("skipped") or []) + [i for i in indices if i in self.feature_bank.unreadable]
        if not keep:
            return {"image": None, "label": None, "index": None, "skipped": skipped}
        rows = torch.tensor(keep, device=batch["index"].device)
        return {**batch, "image": batch["image"][rows], "label": batch["label"][rows], "index": batch["index"][rows],
                "skipped": skipped}

    def _count_unreadable(self, batch: dict[str, Any], stage: str) -> None:
        skipped = batch.get("skipped")
        if skipped:
            self.unreadable.add(stage, self._fingerprint(stage), skipped)

    def _step(self, batch: dict[str, Any], stage: str) -> tuple[PromptOutput | None, torch.Tensor | None, torch.Tensor | None]:
        """The learner's output, the logits and the labels of a batch (None, None, None when every
        image of the batch was unreadable)."""
        if stage == "train":
            batch = self._skip_banked_unreadable(batch)
        self._count_unreadable(batch, stage)
        if batch["image"] is None:
            return None, None, None
        features = self._image_features(batch, stage)
        if features is not None:
            output = self.prompt_learner(image_features=features)
        else:
            output = self.prompt_learner(images=batch["image"])
        return output, self.logits(output), batch["label"]

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "stopping. Lower the learning rate or check the data; the last good checkpoint is kept."
            )

    def _log_unreadable(self, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Epoch-end metrics are synced across processes when first computed, which the progress
            # bar does on process 0 only, before this hook. Computing them here on every process
            # puts the gather below after the same collectives everywhere (else they deadlock).
            self.trainer.progress_bar_metrics  # noqa: B018 - computed for its collectives
        count = self.unreadable.count(stage)
        if count:
            log.warning("%s: %d unreadable images skipped", stage, count)
            self.log(f"{stage}/unreadable_images", float(count), sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self._log_unreadable("train")

    # -- optimisation ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates: the prompt's learnable tensors (a head too, in subclasses)."""
        return [p for p in self.prompt_learner.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError(f"the {self.prompt_learner.name} prompt has no learnable parameters; nothing to fit")
        optimizer = self.optimizer_factory(self.prompt_learner.optimizer_groups(params))
        for group in optimizer.param_groups:  # a learner's group at a multiple of the optimiser's rate
            group["lr"] *= group.pop("lr_scale", 1.0)
        if self.lr_scheduler_name == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(total - 1, self.warmup_epochs * steps_per_epoch)
        # Dassl's constant warm-up: every group at warmup_lr, then each cosine from its own rate.
        schedules = [warmup_cosine(total, warmup, self.warmup_lr / group["lr"] if warmup else 1.0)
                     for group in optimizer.param_groups]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedules), "interval": "step"}}

    def configure_callbacks(self) -> list[pl.Callback]:
        return [RandomStateCheckpoint()]

    # -- checkpoints hold the prompt only -------------------------------------------------------------
    def frozen_modules(self) -> tuple[str, ...]:
        """Submodules that are not learned here: checkpoints leave them out and take them from the
        module being loaded into (the frozen encoder; a frozen head in subclasses)."""
        return ("backbone",)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = tuple(f"{name}." for name in self.frozen_modules())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}
        checkpoint["vlprompt"] = {
            "backbone": self.backbone.identity,
            "method": self.prompt_learner.name,
            "hparams": json.loads(json.dumps(self.prompt_learner.hparams, default=str)),  # plain types only
            "classnames": self.prompt_learner.classnames,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("vlprompt", {})
        if "backbone" in info:
            check_backbone_identity(info["backbone"], self.backbone.identity, what="checkpoint")
        if "hparams" in info:
            self.prompt_learner.match_saved(info)
        # Frozen modules are not in the checkpoint; keep the ones we were built with.
        for name in self.frozen_modules():
            checkpoint["state_dict"].update({f"{name}.{k}": v for k, v in self.get_submodule(name).state_dict().items()})
