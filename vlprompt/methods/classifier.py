"""``PromptClassifier``: few-shot classification by prompt learning, generic over learners.

The pieces it is made of are reusable on their own: :func:`~vlprompt.methods.scoring.prompt_logits`
(scoring), :class:`~vlprompt.methods.features.ImageFeatureCache` (image features by dataset),
:func:`~vlprompt.methods.prompt_init.load_initial_prompt`, :class:`~vlprompt.methods.metrics.ClassCounts`
and the data protocol :class:`~vlprompt.data.protocol.ClassificationData`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from vlprompt.backbones import Backbone, check_backbone_identity
from vlprompt.data.protocol import ClassificationData
from vlprompt.methods.features import ImageFeatureCache
from vlprompt.methods.metrics import ClassCounts, UnreadableImages, accuracy_from_counts, per_class_from_counts
from vlprompt.methods.prompt_init import load_initial_prompt
from vlprompt.methods.random_state import RandomStateCheckpoint
from vlprompt.methods.scoring import prompt_logits
from vlprompt.prompts import PromptLearner, PromptLearnerFactory, PromptOutput, ZeroShotPrompt
from vlprompt.prompts.io import save_prompt

__all__ = ["PromptClassifier", "warmup_cosine"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]

#: The data split each stage reads.
_SPLIT = {"train": "train", "val": "val", "test": "test", "predict": "test"}


def _default_optimizer(params: Iterable[torch.nn.Parameter]) -> Optimizer:
    # CoOp's recipe: SGD, lr 0.002, momentum 0.9, weight decay 5e-4.
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


class PromptClassifier(pl.LightningModule):
    """Train and evaluate a prompt learner for image classification on a frozen encoder.

    Logits come from :func:`~vlprompt.methods.scoring.prompt_logits` (the backbone's logit scale
    times the cosine similarity of image and class text features); the loss is cross-entropy plus
    the learner's own regulariser, if any. Checkpoints hold the prompt learner only (the frozen
    encoder is rebuilt from the config) and the random state, so an interrupted fit resumes exactly.
    The data module, when there is one, is met through
    :class:`~vlprompt.data.protocol.ClassificationData`: the model hands it the backbone's
    preprocessing and follows its class names when evaluating.

    Args:
        backbone: the frozen encoder.
        prompt_learner: a factory ``(backbone, classnames) -> PromptLearner``, e.g. a prompt
            learner class or ``functools.partial(CoOpPromptLearner, n_ctx=4)``; from YAML,
            ``class_path`` + ``init_args``. Zero-shot CLIP when None.
        classnames: class names by label (linked from the data module by the CLI).
        optimizer: factory over the learnable parameters (CoOp's SGD by default).
        lr_scheduler: ``cosine`` (with warm-up) or ``constant``.
        warmup_epochs: epochs of constant warm-up learning rate (CoOp uses 1).
        warmup_lr: learning rate during warm-up.
        cache_image_features: reuse image features across epochs and evaluations when the
            learner leaves the image tower untouched, keyed by the identity of the data (its
            samples and preprocessing). Exact for evaluation; in training, used only when the data
            module does no random augmentation, unless ``cache_augmented_train`` is set (then the
            first augmented view of each image is reused: faster, but less augmentation).
        cache_augmented_train: see above.
        init_prompt: a saved vlprompt prompt directory or a CoOp/CoCoOp/MaPLe (Dassl) checkpoint
            to start from.
        label_smoothing: cross-entropy label smoothing.
    """

    #: Constructor arguments that are objects, not settings: kept out of saved hyper-parameters.
    _not_hyperparameters: tuple[str, ...] = ("backbone", "prompt_learner", "optimizer")

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory | None = None,
        classnames: list[str] | None = None,
        *,
        optimizer: OptimizerFactory = _default_optimizer,
        lr_scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        cache_image_features: bool = True,
        cache_augmented_train: bool = False,
        init_prompt: str | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not classnames:
            raise ValueError(
                "PromptClassifier needs class names: pass classnames=[...] or let the CLI link them "
                "from the data module"
            )
        self.save_hyperparameters(ignore=list(self._not_hyperparameters))
        self.backbone = backbone
        factory = prompt_learner or ZeroShotPrompt
        self.prompt_learner: PromptLearner = factory(backbone, list(classnames))
        self.optimizer_factory = optimizer
        self.lr_scheduler_name = lr_scheduler
        self.warmup_epochs, self.warmup_lr = warmup_epochs, warmup_lr
        self.cache_image_features = cache_image_features
        self.cache_augmented_train = cache_augmented_train
        self.label_smoothing = label_smoothing
        self.feature_cache = ImageFeatureCache()
        self.unreadable = UnreadableImages()
        #: Accuracy of each class in the last test; None for a class without test images.
        self.per_class_accuracy: dict[str, float | None] = {}
        if init_prompt:
            load_initial_prompt(self.prompt_learner, init_prompt)
        self._reset_metrics()

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
        dataset = dm.dataset(_SPLIT[stage]) if dm is not None else None
        return dataset.fingerprint if dataset is not None else ""

    def setup(self, stage: str) -> None:
        dm = self.classification_data()
        if dm is not None:
            dm.set_preprocess(self.backbone.preprocess_cfg)

    def _sync_classnames_with_data(self) -> None:
        dm = self.classification_data()
        if dm is not None and list(dm.classnames) != self.prompt_learner.classnames:
            names = list(dm.classnames)
            log.info("data has %d classes (%s...); re-pointing the prompt at them", len(names), ", ".join(names[:3]))
            self.set_classnames(names)
            self.to(self.device)

    # -- image features ----------------------------------------------------------------------------
    def _cacheable(self, stage: str) -> bool:
        if not self.cache_image_features or self.prompt_learner.uses_image_tower:
            return False
        dm = self.classification_data()
        if dm is None:
            return False
        return stage != "train" or self.cache_augmented_train or not dm.train_augmentation

    def _image_features(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        """Cached image features of the batch when the learner and the data allow it, else None."""
        if "index" not in batch or not self._cacheable(stage):
            return None
        fingerprint = self._fingerprint(stage)
        if not fingerprint:
            return None
        return self.feature_cache.features(fingerprint, batch["index"], batch["image"], self.prompt_learner.encode_images)

    # -- steps -----------------------------------------------------------------------------------
    def _count_unreadable(self, batch: dict[str, Any], stage: str) -> None:
        skipped = batch.get("skipped")
        if skipped:
            self.unreadable.add(stage, self._fingerprint(stage), skipped)

    def _step(self, batch: dict[str, Any], stage: str) -> tuple[PromptOutput | None, torch.Tensor | None, torch.Tensor | None]:
        self._count_unreadable(batch, stage)
        if batch["image"] is None:  # every image of the batch was unreadable
            return None, None, None
        features = self._image_features(batch, stage)
        if features is not None:
            output = self.prompt_learner(image_features=features)
        else:
            output = self.prompt_learner(images=batch["image"])
        return output, self.logits(output), batch["label"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        output, logits, labels = self._step(batch, "train")
        if logits is None:
            return None
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        extra = self.prompt_learner.extra_loss(output, logits, labels)
        if extra is not None:
            self.log("train/extra_loss", extra.detach())
            loss = loss + extra
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "stopping. Lower the learning rate or check the data; the last good checkpoint is kept."
            )
        self.train_acc(logits.detach().argmax(-1), labels)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        _, logits, labels = self._step(batch, "val")
        if logits is None:
            return
        self.log("val/loss", F.cross_entropy(logits, labels), batch_size=len(labels), sync_dist=True)
        self.val_acc(logits.argmax(-1), labels)
        self.log("val/acc", self.val_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(labels))

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        _, logits, labels = self._step(batch, "test")
        if logits is not None:
            self.test_counts.update(logits.argmax(-1), labels)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor] | None:
        _, logits, _ = self._step(batch, "predict")
        if logits is None:
            return None
        probs = logits.softmax(-1)
        confidence, prediction = probs.max(-1)
        return {"index": batch["index"], "prediction": prediction, "confidence": confidence}

    # -- metrics and class names per stage ------------------------------------------------------
    def _reset_metrics(self) -> None:
        n = max(2, self.prompt_learner.num_classes)  # torchmetrics needs >= 2 classes
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_counts = ClassCounts(self.prompt_learner.num_classes)
        self._metric_attributes = None  # Lightning caches which attribute holds which metric

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Evaluate on other classes (e.g. novel ones): re-point the prompt and reset metrics."""
        self.prompt_learner.set_classnames(classnames)
        self.hparams["classnames"] = list(self.prompt_learner.classnames)
        self._reset_metrics()

    # Evaluation follows the classes of the data being evaluated (e.g. novel classes), checked
    # after any checkpoint has been restored.
    def on_test_start(self) -> None:
        self._sync_classnames_with_data()
        self.test_counts.reset()

    def on_predict_start(self) -> None:
        self._sync_classnames_with_data()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate":
            self._sync_classnames_with_data()

    def on_test_epoch_end(self) -> None:
        names = self.prompt_learner.classnames
        correct, total = self.test_counts.compute()
        per_class = per_class_from_counts(correct, total)
        self.per_class_accuracy = dict(zip(names, per_class))
        scored = [a for a in per_class if a is not None]
        empty = [n for n, a in zip(names, per_class) if a is None]
        if empty:
            log.warning("%d classes had no test images and are left out of the per-class mean: %s",
                        len(empty), ", ".join(empty[:10]))
        self.log("test/acc", accuracy_from_counts(correct, total), sync_dist=True)
        self.log("test/acc_per_class_mean", sum(scored) / len(scored) if scored else float("nan"), sync_dist=True)
        self.log("test/images", float(total.sum()), sync_dist=True)
        self._log_unreadable("test")

    def on_train_epoch_end(self) -> None:
        self._log_unreadable("train")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_unreadable("val")

    def _log_unreadable(self, stage: str) -> None:
        count = self.unreadable.count(stage)
        if count:
            log.warning("%s: %d unreadable images skipped", stage, count)
            self.log(f"{stage}/unreadable_images", float(count), sync_dist=True)

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.prompt_learner.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"the {self.prompt_learner.name} prompt has no learnable parameters; nothing to fit")
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_name == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(total - 1, self.warmup_epochs * steps_per_epoch)
        base_lr = optimizer.param_groups[0]["lr"]
        schedule = warmup_cosine(total, warmup, self.warmup_lr / base_lr if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"}}

    def configure_callbacks(self) -> list[pl.Callback]:
        return [RandomStateCheckpoint()]

    # -- checkpoints hold the prompt only -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")}
        checkpoint["vlprompt"] = {
            "backbone": self.backbone.identity,
            "method": self.prompt_learner.name,
            "classnames": self.prompt_learner.classnames,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("vlprompt", {})
        if "backbone" in info:
            check_backbone_identity(info["backbone"], self.backbone.identity, what="checkpoint")
        # The frozen encoder is not in the checkpoint; keep the one we were built with.
        checkpoint["state_dict"].update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
