"""``PromptClassifier``: few-shot classification by prompt learning, generic over learners."""

from __future__ import annotations

import logging
import math
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
from vlprompt.prompts import PromptLearner, PromptLearnerFactory, PromptOutput, ZeroShotPrompt
from vlprompt.prompts.io import load_prompt, read_prompt_config, save_prompt

__all__ = ["PromptClassifier", "warmup_cosine"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]


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

    Logits are the backbone's logit scale times the cosine similarity of image and class text
    features; the loss is cross-entropy plus the learner's own regulariser, if any. Checkpoints
    hold the prompt learner only (the frozen encoder is rebuilt from the config).

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
        cache_image_features: reuse image features across epochs when the learner leaves the
            image tower untouched. Exact for evaluation; in training, used only when the data
            module does no random augmentation, unless ``cache_augmented_train`` is set (then the
            first augmented view of each image is reused: faster, but less augmentation).
        cache_augmented_train: see above.
        init_prompt: a saved vlprompt prompt directory or a CoOp/CoCoOp (Dassl) checkpoint to
            start from.
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
        self._feature_cache: dict[str, dict[int, torch.Tensor]] = {}
        self.skipped_images = 0
        self.per_class_accuracy: dict[str, float] = {}
        if init_prompt:
            self.load_initial_prompt(init_prompt)
        self._reset_metrics()

    # -- prompt initialisation -------------------------------------------------------------
    def load_initial_prompt(self, path: str | Path) -> None:
        """Start from a saved vlprompt prompt (directory) or a Dassl checkpoint (file)."""
        path = Path(path)
        if path.is_dir():
            config = read_prompt_config(path)
            if config["method"] != self.prompt_learner.name:
                raise ValueError(f"{path} holds a {config['method']!r} prompt, but this model uses {self.prompt_learner.name!r}")
            saved = load_prompt(path, self.backbone, classnames=self.prompt_learner.classnames)
            self.prompt_learner.load_state_dict(saved.state_dict())
        elif hasattr(self.prompt_learner, "load_dassl_checkpoint"):
            self.prompt_learner.load_dassl_checkpoint(path)
        else:
            raise ValueError(f"{path} is not a saved prompt directory, and {self.prompt_learner.name} cannot import files")
        log.info("initialised the %s prompt from %s", self.prompt_learner.name, path)

    def save_prompt(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Save the learned prompt (``config.json`` + ``prompt.safetensors``)."""
        return save_prompt(self.prompt_learner, directory, overwrite=overwrite)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``[B, C]``."""
        return self.logits(self.prompt_learner(images=images, image_features=image_features))

    def logits(self, output: PromptOutput) -> torch.Tensor:
        if output.logits is not None:  # a learned head
            return output.logits.float()
        image = F.normalize(output.image_features.float(), dim=-1)
        text = F.normalize(output.text_features.float(), dim=-1)
        if text.dim() == 3:  # per-image classifiers
            logits = torch.einsum("bd,bcd->bc", image, text)
        else:
            logits = image @ text.t()
        logits = self.backbone.logit_scale.float() * logits
        bias = self.backbone.logit_bias
        return logits if bias is None else logits + bias.float()

    # -- image feature cache ---------------------------------------------------------------
    def _cacheable(self, stage: str) -> bool:
        if not self.cache_image_features or self.prompt_learner.uses_image_tower:
            return False
        if stage == "train":
            dm = getattr(self._trainer, "datamodule", None)
            return self.cache_augmented_train or not getattr(dm, "train_augmentation", True)
        return True

    def _cached_image_features(self, batch: dict[str, Any], stage: str, dataloader_idx: int = 0) -> torch.Tensor:
        images = batch["image"]
        key = self._cache_key(stage, dataloader_idx)
        cache = self._feature_cache.setdefault(key, {})
        indices = [int(i) for i in batch["index"]]
        missing = [j for j, i in enumerate(indices) if i not in cache]
        if missing:
            with torch.no_grad():
                fresh = self.prompt_learner.encode_images(images[missing])
            for j, feat in zip(missing, fresh):
                cache[indices[j]] = feat.detach()
        return torch.stack([cache[i] for i in indices])

    def _cache_key(self, stage: str, dataloader_idx: int) -> str:
        dm = getattr(self._trainer, "datamodule", None)
        ds = getattr(dm, "datasets", {}).get({"train": "train", "val": "val"}.get(stage, "test")) if dm else None
        return f"{stage}/{dataloader_idx}/{ds.cache_key if ds is not None else ''}"

    # -- steps -----------------------------------------------------------------------------------
    def _step(self, batch: dict[str, Any], stage: str, dataloader_idx: int = 0):
        self.skipped_images += int(batch.get("skipped", 0))
        if batch["image"] is None:  # every image of the batch was unreadable
            return None, None, None
        if self._cacheable(stage) and "index" in batch:
            output = self.prompt_learner(image_features=self._cached_image_features(batch, stage, dataloader_idx))
        else:
            output = self.prompt_learner(images=batch["image"])
        logits = self.logits(output)
        return output, logits, batch["label"]

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
        _, logits, labels = self._step(batch, "val", dataloader_idx)
        if logits is None:
            return
        self.log("val/loss", F.cross_entropy(logits, labels), batch_size=len(labels))
        self.val_acc(logits.argmax(-1), labels)
        self.log("val/acc", self.val_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(labels))

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        _, logits, labels = self._step(batch, "test", dataloader_idx)
        if logits is None:
            return
        self.test_acc(logits.argmax(-1), labels)
        self.test_per_class.update(logits.argmax(-1), labels)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True, batch_size=len(labels))

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor] | None:
        _, logits, _ = self._step(batch, "predict", dataloader_idx)
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
        self.test_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_per_class = MulticlassAccuracy(num_classes=n, average=None)
        self._metric_attributes = None  # Lightning caches which attribute holds which metric

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Evaluate on other classes (e.g. novel ones): re-point the prompt and reset metrics."""
        self.prompt_learner.set_classnames(classnames)
        self.hparams["classnames"] = list(classnames)
        self._reset_metrics()
        self._feature_cache.clear()

    def _sync_classnames_with_data(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "classnames", None)
        if names is not None and list(names) != self.prompt_learner.classnames:
            log.info("data has %d classes (%s...); re-pointing the prompt at them", len(names), ", ".join(names[:3]))
            self.set_classnames(names)
            self.to(self.device)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_preprocess"):
            dm.set_preprocess(self.backbone.preprocess_cfg)

    # Evaluation follows the classes of the data being evaluated (e.g. novel classes), checked
    # after any checkpoint has been restored.
    def on_test_start(self) -> None:
        self._sync_classnames_with_data()

    def on_predict_start(self) -> None:
        self._sync_classnames_with_data()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate":
            self._sync_classnames_with_data()

    def on_test_epoch_end(self) -> None:
        per_class = self.test_per_class.compute().tolist()[: self.prompt_learner.num_classes]
        self.per_class_accuracy = dict(zip(self.prompt_learner.classnames, per_class))
        self.log("test/acc_per_class_mean", float(sum(per_class) / max(1, len(per_class))))
        self.test_per_class.reset()
        self._log_skipped("test")

    def on_train_epoch_end(self) -> None:
        self.prompt_learner.on_train_epoch_end(self.current_epoch, self.trainer.max_epochs)
        self._log_skipped("train")

    def on_train_end(self) -> None:
        self.prompt_learner.on_train_end()

    def _log_skipped(self, stage: str) -> None:
        if self.skipped_images:
            log.warning("%s: skipped %d unreadable images so far", stage, self.skipped_images)
            self.log(f"{stage}/skipped_images", float(self.skipped_images))

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

    # -- checkpoints hold the prompt only -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")}
        checkpoint["vlprompt"] = {
            "backbone": self.backbone.identity,
            "method": self.prompt_learner.name,
            "classnames": self.prompt_learner.classnames,
            "learner_state": self.prompt_learner.training_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("vlprompt", {})
        if "backbone" in info:
            check_backbone_identity(info["backbone"], self.backbone.identity, what="checkpoint")
        self.prompt_learner.load_training_state(info.get("learner_state", {}))
        # The frozen encoder is not in the checkpoint; keep the one we were built with.
        checkpoint["state_dict"].update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
