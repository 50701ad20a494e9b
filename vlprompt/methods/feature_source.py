"""Where a classifier's image features come from: the image tower, the in-memory cache
(:class:`~vlprompt.methods.features.ImageFeatureCache`) or, for augmented training views, the
on-disk bank (:class:`~vlprompt.methods.feature_bank.FeatureBank`). Both only serve learners that
leave the image tower untouched (CoOp, CoCoOp, KgCoOp, zero-shot), whose image features never change.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from vlprompt.data.images import ImageDataset
from vlprompt.data.protocol import ClassificationData, LabelsOnlyDataset, LoaderWorkers
from vlprompt.methods.data_link import SPLIT_OF_STAGE, fingerprint_of
from vlprompt.methods.feature_bank import FeatureBank
from vlprompt.methods.features import ImageFeatureCache
from vlprompt.prompts import PromptLearner

__all__ = ["ImageFeatureSource"]

log = logging.getLogger(__name__)


class ImageFeatureSource:
    """The feature cache/bank policy of a classifier.

    Args:
        learner: the prompt learner whose images are encoded.
        cache_image_features: reuse image features across epochs and evaluations, keyed by the
            identity of the data; in training only without random augmentation, unless
            ``cache_augmented_train`` (then the first augmented view of each image is reused).
        cache_augmented_train: see above.
        feature_bank: a folder where the features of augmented training views are stored, per epoch.
        feature_bank_dtype: its storage precision.
    """

    def __init__(
        self,
        learner: PromptLearner,
        *,
        cache_image_features: bool = True,
        cache_augmented_train: bool = False,
        feature_bank: str | None = None,
        feature_bank_dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        self.learner = learner
        self.cache_image_features, self.cache_augmented_train = cache_image_features, cache_augmented_train
        self.cache = ImageFeatureCache()
        self.bank = FeatureBank(feature_bank, learner.backbone.identity, dtype=feature_bank_dtype) if feature_bank else None

    def cacheable(self, stage: str, dm: ClassificationData | None) -> bool:
        """Whether image features of ``stage`` may come from the cache: the learner must leave the
        image tower untouched, and in training the data must not be randomly augmented (unless
        ``cache_augmented_train``: then the first augmented view of each image is reused)."""
        if not self.cache_image_features or self.learner.uses_image_tower or dm is None:
            return False
        return stage != "train" or self.cache_augmented_train or not dm.train_augmentation

    def banked_train_data(self, dm: ClassificationData | None) -> ImageDataset | None:
        """The augmented training dataset whose views come from the feature bank, or None."""
        if self.bank is None or self.learner.uses_image_tower or dm is None or not dm.train_augmentation:
            return None
        return dm.dataset("train")

    def setup_fit(self, dm: ClassificationData | None) -> None:
        """Before a fit: check that the bank can serve the data, and read training images only when
        their features do not come from the bank."""
        banked = self.banked_train_data(dm)
        if banked is not None:
            self.bank.folder(banked, 0)  # a set-up the bank cannot serve fails before training
            # Filling decodes and augments every view: with the training loader's workers.
            self.bank.num_workers = int(dm.num_workers) if isinstance(dm, LoaderWorkers) else 0
        # With a feature bank the training loader need not decode and augment images. Set for the
        # whole fit, before Lightning first starts the training loader (``estimated_stepping_batches``
        # in ``configure_optimizers`` already does): loader workers read the mode per item, so a
        # switch while they fetch would mix images and empty placeholders in one batch.
        train = dm.dataset("train") if dm is not None else None
        if isinstance(train, LabelsOnlyDataset):
            train.set_labels_only(banked is not None)

    def fill(self, dm: ClassificationData | None, epoch: int, device: torch.device, trainer: Any) -> None:
        """Before a training epoch: store the features of its views not stored yet."""
        banked = self.banked_train_data(dm)
        if banked is not None:
            self.bank.fill(banked, epoch, self.learner.encode_images, device, rank=trainer.global_rank,
                           world_size=trainer.world_size, barrier=trainer.strategy.barrier)

    def end_fit(self, dm: ClassificationData | None) -> None:
        """After a fit: the training data reads images again."""
        banked = self.banked_train_data(dm)
        if banked is not None:
            banked.set_labels_only(False)
            log.info("feature bank %s: this run encoded %d augmented views, the rest were stored",
                     self.bank.root, self.bank.encoded)

    def features(self, batch: dict[str, Any], stage: str, dm: ClassificationData | None, epoch: int,
                 device: torch.device) -> torch.Tensor | None:
        """Stored or cached image features of the batch when the learner and the data allow it, else None."""
        if stage == "train" and "index" in batch:
            banked = self.banked_train_data(dm)
            if banked is not None:
                return self.bank.features(banked, epoch, batch["index"]).to(device)
        if "index" not in batch or not self.cacheable(stage, dm):
            return None
        fingerprint = fingerprint_of(dm.dataset(SPLIT_OF_STAGE[stage]))
        if not fingerprint:
            return None
        return self.cache.features(fingerprint, batch["index"], batch["image"], self.learner.encode_images)

    def skip_banked_unreadable(self, batch: dict[str, Any], dm: ClassificationData | None) -> dict[str, Any]:
        """A training batch read without images (feature bank) lists its unreadable images, which
        the bank found, as skipped, the way the loader does when it reads them."""
        if self.banked_train_data(dm) is None or batch.get("index") is None or not self.bank.unreadable:
            return batch
        indices = batch["index"].tolist()
        keep = [j for j, i in enumerate(indices) if i not in self.bank.unreadable]
        if len(keep) == len(indices):
            return batch
        skipped = list(batch.get("skipped") or []) + [i for i in indices if i in self.bank.unreadable]
        if not keep:
            return {"image": None, "label": None, "index": None, "skipped": skipped}
        rows = torch.tensor(keep, device=batch["index"].device)
        return {**batch, "image": batch["image"][rows], "label": batch["label"][rows], "index": batch["index"][rows],
                "skipped": skipped}
