"""``PromptClassifier``: few-shot classification by prompt learning, generic over learners, on one
task or on several at once (MVLPT: Shen et al., "Multitask Vision-Language Prompt Tuning", WACV 2024).

It is :class:`~vlprompt.methods.module.PromptModule` plus small parts:
:class:`~vlprompt.methods.feature_source.ImageFeatureSource` (image features from the tower, the
cache or the feature bank), :class:`~vlprompt.methods.tasks.TaskScorer` (which classes belong to
which task; single-task classification is one task) and a report
(:mod:`~vlprompt.methods.reports`: what is measured and logged). The data module is met through
:class:`~vlprompt.data.protocol.ClassificationData` (and
:class:`~vlprompt.data.protocol.MultiTaskData` for its tasks).

Where vlprompt differs from MVLPT's reference code, on purpose:

* ``loss="task"`` excludes the other tasks' classes from the softmax (their logits are -inf).
  The reference's per-task option multiplies them by 0, which leaves ``exp(0)`` terms in the
  denominator. ``loss="union"`` (the default) is the reference's plain cross-entropy over the
  union of classes.
* Evaluation takes each image's argmax over its own task's classes, as the reference does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vlprompt.backbones import Backbone
from vlprompt.data.multitask import Task
from vlprompt.data.protocol import MultiTaskData
from vlprompt.methods.data_link import ReadsClassificationData
from vlprompt.methods.feature_bank import FeatureBank
from vlprompt.methods.feature_source import ImageFeatureSource
from vlprompt.methods.features import ImageFeatureCache
from vlprompt.methods.metrics import ClassCounts
from vlprompt.methods.module import (
    OptimizerFactory,
    PromptModule,
    default_optimizer,
    warmup_cosine,
)
from vlprompt.methods.optimization import LRSchedule
from vlprompt.methods.reports import ClassAccuracyReport, ClassificationReport
from vlprompt.methods.tasks import TaskScorer, one_task
from vlprompt.prompts import PromptLearnerFactory, PromptOutput

__all__ = ["MultiTaskLoss", "PromptClassifier", "warmup_cosine"]

log = logging.getLogger(__name__)

MultiTaskLoss = Literal["union", "task"]


class PromptClassifier(ReadsClassificationData, PromptModule):
    """Train and evaluate a prompt learner for image classification on a frozen encoder.

    Logits come from :func:`~vlprompt.methods.scoring.prompt_logits` (the backbone's logit scale
    times the cosine similarity of image and class text features); the loss is cross-entropy plus
    the learner's own regulariser, if any. Checkpoints hold the prompt learner only (the frozen
    encoder is rebuilt from the config) and the random state, so an interrupted fit resumes exactly.
    The model hands the data module the backbone's preprocessing and follows its class names (and
    tasks) when evaluating. Several tasks (MVLPT) tune one prompt over the union of their classes,
    the learned tensors shared by every task; :class:`~vlprompt.methods.MultiTaskPromptClassifier`
    is this class reporting each task's score.

    Args:
        backbone: the frozen encoder.
        prompt_learner: a factory ``(backbone, classnames) -> PromptLearner``, e.g. a prompt
            learner class or ``functools.partial(CoOpPromptLearner, n_ctx=4)``; from YAML,
            ``class_path`` + ``init_args``. Zero-shot CLIP when None.
        classnames: class names by label, of every task, task after task (linked from the data
            module by the CLI).
        loss: ``union`` (cross-entropy over every class) or ``task`` (over the sample's own task's
            classes only); the same with one task.
        optimizer: factory over the learnable parameters (CoOp's SGD by default).
        lr_scheduler: ``dassl`` (the papers' per-epoch cosine, exactly), ``cosine`` (per step, down
            to 0) or ``constant`` (:mod:`~vlprompt.methods.optimization`).
        warmup_epochs: epochs of constant warm-up learning rate (CoOp uses 1).
        warmup_lr: learning rate during warm-up.
        drop_last: drop the last incomplete training batch, as Dassl's loader (asked of the data
            module, :class:`~vlprompt.data.protocol.TrainBatches`; the paper recipes set it).
        cache_image_features: reuse image features across epochs and evaluations when the
            learner leaves the image tower untouched, keyed by the identity of the data (its
            samples and preprocessing). Exact for evaluation; in training, used only when the data
            module does no random augmentation, unless ``cache_augmented_train`` is set (then the
            first augmented view of each image is reused: faster, but less augmentation).
        cache_augmented_train: see above.
        init_prompt: a saved vlprompt prompt directory or a CoOp/CoCoOp/MaPLe (Dassl) checkpoint
            to start from.
        label_smoothing: cross-entropy label smoothing.
        feature_bank: a folder where the image features of augmented training views are stored and
            reused (:class:`~vlprompt.methods.feature_bank.FeatureBank`), for learners that leave the
            image tower untouched: each epoch's views are encoded once, in large no-grad batches,
            before the epoch, and shared by every run that sees the same images (methods, shot
            counts, few-shot draws). Needs the data module's ``augment_seed``. Same features as
            without it in fp32, to float32 rounding (the bank encodes in other batch shapes).
        feature_bank_dtype: ``float32`` or ``float16`` storage.
    """

    #: What is measured and logged (:mod:`~vlprompt.methods.reports`).
    report: type[ClassificationReport] = ClassAccuracyReport
    #: Settings this class name gained when single- and multi-task classification became one
    #: class: left out of the saved hyper-parameters while at their defaults, so that checkpoints
    #: and hparams files read as before.
    _recorded_when_set: tuple[str, ...] = ("loss", "drop_last")

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory | None = None,
        classnames: list[str] | None = None,
        *,
        loss: MultiTaskLoss = "union",
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: LRSchedule = "cosine",
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        drop_last: bool = False,
        cache_image_features: bool = True,
        cache_augmented_train: bool = False,
        init_prompt: str | None = None,
        label_smoothing: float = 0.0,
        feature_bank: str | None = None,
        feature_bank_dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        if not classnames:
            raise ValueError(f"{type(self).__name__} needs class names (of every task, task after task): pass "
                             "classnames=[...] or let the CLI link them from the data module")
        if loss not in ("union", "task"):
            raise ValueError(f"loss must be union or task, not {loss!r}")
        super().__init__(backbone, prompt_learner, classnames, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, drop_last=drop_last, init_prompt=init_prompt)
        defaults = {"loss": "union", "feature_bank": None, "feature_bank_dtype": "float32", "drop_last": False}
        given = {"loss": loss, "feature_bank": feature_bank, "feature_bank_dtype": feature_bank_dtype,
                 "drop_last": drop_last}
        unset = [k for k in self._recorded_when_set if given[k] == defaults[k]]
        self.save_hyperparameters(ignore=[*self._not_hyperparameters, *unset])
        self.loss_mode, self.label_smoothing = loss, label_smoothing
        self.image_features = ImageFeatureSource(
            self.prompt_learner, cache_image_features=cache_image_features,
            cache_augmented_train=cache_augmented_train, feature_bank=feature_bank, feature_bank_dtype=feature_bank_dtype)
        self.task_scorer = TaskScorer(self.prompt_learner.classnames)
        #: Accuracy of each class in the last single-task test; None for a class without test images.
        self.per_class_accuracy: dict[str, float | None] = {}
        #: Each task's score in the last test scored per task (None for a task without test images).
        self.task_results: dict[str, float | None] = {}
        self._reset_metrics()

    # -- the parts, by their former names ---------------------------------------------------------
    @property
    def feature_cache(self) -> ImageFeatureCache:
        """The image-feature cache (may be shared by several models: assign one)."""
        return self.image_features.cache

    @feature_cache.setter
    def feature_cache(self, cache: ImageFeatureCache) -> None:
        self.image_features.cache = cache

    @property
    def feature_bank(self) -> FeatureBank | None:
        return self.image_features.bank

    @property
    def tasks(self) -> list[Task]:
        return self.task_scorer.tasks

    @property
    def test_counts(self) -> ClassCounts:
        return self.scores.test_counts

    # -- forward -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``[B, C]``."""
        return self.logits(self.prompt_learner(images=images, image_features=image_features))

    def own_task_logits(self, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``logits`` with every class outside each image's own task set to -inf."""
        return self.task_scorer.own_task_logits(logits, task_ids)

    # -- classes, tasks and the data -------------------------------------------------------------
    def _reset_metrics(self) -> None:
        self.scores = self.report(self.prompt_learner.num_classes).to(self.task_scorer.task_mask.device)
        self._metric_attributes = None  # Lightning caches which attribute holds which metric

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Evaluate on other classes (e.g. novel ones), as one task: re-point the prompt and reset metrics."""
        self.prompt_learner.set_classnames(classnames)
        self.hparams["classnames"] = list(self.prompt_learner.classnames)
        self.set_tasks([one_task(self.prompt_learner.classnames)])

    def set_tasks(self, tasks: Sequence[Task]) -> None:
        """Which labels belong to which task (they must tile the learner's classes); resets metrics."""
        self.task_scorer.set_tasks(tasks, self.prompt_learner.classnames)
        self._reset_metrics()

    def _follow_data(self) -> None:
        """Follow the data module's classes and tasks (novel classes, target tasks after source training)."""
        dm = self.classification_data()
        if dm is None:
            return
        names = list(dm.classnames)
        changed = names != self.prompt_learner.classnames
        if changed:
            log.info("data has %d classes (%s...); re-pointing the prompt at them", len(names), ", ".join(names[:3]))
            self.set_classnames(names)
        tasks = list(dm.tasks) if isinstance(dm, MultiTaskData) and dm.tasks else [one_task(names)]
        if tasks != self.tasks:
            self.set_tasks(tasks)
            changed = True
        if changed:
            self.to(self.device)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.classification_data()
        if dm is not None:
            dm.set_preprocess(self.backbone.preprocess_cfg)
        if stage == "fit":
            self.image_features.setup_fit(dm)
        if self.report.follows_data_at_setup:
            self._follow_data()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.image_features.fill(self.classification_data(), self.current_epoch, self.device, self.trainer)

    def on_fit_end(self) -> None:
        self.image_features.end_fit(self.classification_data())

    # Evaluation follows the classes of the data being evaluated (e.g. novel classes), checked
    # after any checkpoint has been restored.
    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate":
            self._follow_data()
        self.scores.on_validation_start()

    def on_test_start(self) -> None:
        self._follow_data()
        self.test_counts.reset()

    def on_predict_start(self) -> None:
        self._follow_data()

    # -- steps -----------------------------------------------------------------------------------
    def _step(self, batch: dict[str, Any], stage: str) -> tuple[PromptOutput | None, torch.Tensor | None, torch.Tensor | None]:
        """The learner's output, the logits and the labels of a batch (None, None, None when every
        image of the batch was unreadable)."""
        dm = self.classification_data()
        if stage == "train":
            batch = self.image_features.skip_banked_unreadable(batch, dm)
        self._count_unreadable(batch, stage)
        if batch["image"] is None:
            return None, None, None
        features = self.image_features.features(batch, stage, dm, self.current_epoch, self.device)
        if features is not None:
            output = self.prompt_learner(image_features=features)
        else:
            output = self.prompt_learner(images=batch["image"])
        return output, self.logits(output), batch["label"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        output, logits, labels = self._step(batch, "train")
        if logits is None:
            return None
        task_ids = self.task_scorer.task_ids(batch, labels)
        scored = self.own_task_logits(logits, task_ids) if self.loss_mode == "task" else logits
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
        self.scores.training_step(self, logits, labels)
        return loss

    def _own_task_predictions(self, batch: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.own_task_logits(logits, self.task_scorer.task_ids(batch, labels)).argmax(-1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        _, logits, labels = self._step(batch, "val")
        if logits is not None:
            self.scores.validation_step(self, logits, self._own_task_predictions(batch, logits, labels), labels)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        _, logits, labels = self._step(batch, "test")
        if logits is not None:
            self.test_counts.update(self._own_task_predictions(batch, logits, labels), labels)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor] | None:
        _, logits, labels = self._step(batch, "predict")
        if logits is None:
            return None
        task_ids = self.task_scorer.task_ids(batch, labels)
        return self.scores.prediction(batch["index"], self.own_task_logits(logits, task_ids), task_ids)

    # -- metrics -------------------------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.scores.after_sanity_check()
            return
        self.scores.validation_epoch_end(self, self.tasks)
        self._log_unreadable("val")

    def on_test_epoch_end(self) -> None:
        self.scores.test_epoch_end(self, self.prompt_learner.classnames, self.tasks)
        self._log_unreadable("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vlprompt"].update(self.scores.checkpoint_record(self.tasks))
