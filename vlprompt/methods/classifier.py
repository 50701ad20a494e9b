"""``PromptClassifier``: few-shot classification by prompt learning, generic over learners.

What it shares with other prompt-training procedures lives in
:class:`~vlprompt.methods.module.PromptModule` and the small pieces it is made of:
:func:`~vlprompt.methods.scoring.prompt_logits` (scoring),
:class:`~vlprompt.methods.features.ImageFeatureCache` (image features by dataset),
:func:`~vlprompt.methods.prompt_init.load_initial_prompt`, :class:`~vlprompt.methods.metrics.ClassCounts`
and the data protocol :class:`~vlprompt.data.protocol.ClassificationData`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from vlprompt.backbones import Backbone
from vlprompt.methods.metrics import ClassCounts, accuracy_from_counts, per_class_from_counts
from vlprompt.methods.module import OptimizerFactory, PromptModule, default_optimizer, warmup_cosine
from vlprompt.prompts import PromptLearnerFactory

__all__ = ["PromptClassifier", "warmup_cosine"]

log = logging.getLogger(__name__)


class PromptClassifier(PromptModule):
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
        feature_bank, feature_bank_dtype: store and reuse the image features of augmented
            training views (see :class:`~vlprompt.methods.module.PromptModule`).
    """

    #: Constructor arguments that are objects, not settings: kept out of saved hyper-parameters.
    _not_hyperparameters: tuple[str, ...] = ("backbone", "prompt_learner", "optimizer")

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory | None = None,
        classnames: list[str] | None = None,
        *,
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        cache_image_features: bool = True,
        cache_augmented_train: bool = False,
        init_prompt: str | None = None,
        label_smoothing: float = 0.0,
        feature_bank: str | None = None,
        feature_bank_dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        if not classnames:
            raise ValueError(
                "PromptClassifier needs class names: pass classnames=[...] or let the CLI link them "
                "from the data module"
            )
        super().__init__(backbone, prompt_learner, classnames, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, cache_image_features=cache_image_features,
                         cache_augmented_train=cache_augmented_train, init_prompt=init_prompt,
                         feature_bank=feature_bank, feature_bank_dtype=feature_bank_dtype)
        self.save_hyperparameters(ignore=list(self._not_hyperparameters))
        self.label_smoothing = label_smoothing
        #: Accuracy of each class in the last test; None for a class without test images.
        self.per_class_accuracy: dict[str, float | None] = {}
        self._reset_metrics()

    def _sync_classnames_with_data(self) -> None:
        dm = self.classification_data()
        if dm is not None and list(dm.classnames) != self.prompt_learner.classnames:
            names = list(dm.classnames)
            log.info("data has %d classes (%s...); re-pointing the prompt at them", len(names), ", ".join(names[:3]))
            self.set_classnames(names)
            self.to(self.device)

    # -- steps -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        output, logits, labels = self._step(batch, "train")
        if logits is None:
            return None
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        loss = self.prompt_learner.classification_weight * ce
        extra = self.prompt_learner.extra_loss(output, logits, labels)
        if extra is not None:
            self.log("train/extra_loss", extra.detach())
            loss = loss + extra
        self._check_finite(loss)
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

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_unreadable("val")
