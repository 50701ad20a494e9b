"""How a method finds its data: the trainer's data module, met through the protocols of
:mod:`vlprompt.data.protocol` (never by probing for attributes)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl

from vlprompt.data.protocol import ClassificationData, FingerprintedDataset

__all__ = ["SPLIT_OF_STAGE", "ReadsClassificationData", "attached_data", "classification_data", "fingerprint_of"]

#: The data split each stage reads.
SPLIT_OF_STAGE = {"train": "train", "val": "val", "test": "test", "predict": "test"}


def attached_data(module: pl.LightningModule) -> Any:
    """The data module of the trainer ``module`` is attached to; None without either."""
    trainer = module._trainer
    return trainer.datamodule if trainer is not None else None


def classification_data(module: pl.LightningModule) -> ClassificationData | None:
    """The attached data module when it implements :class:`ClassificationData`; None when there is
    none or it does not (then the model cannot hand over its preprocessing, and says so)."""
    dm = attached_data(module)
    if dm is None:
        return None
    if not isinstance(dm, ClassificationData):
        warnings.warn(
            f"{type(dm).__name__} does not implement vlprompt.data.ClassificationData; the backbone's "
            "preprocessing is not handed to it, class names are not followed and image features are not cached",
            stacklevel=3,
        )
        return None
    return dm


def fingerprint_of(dataset: Any) -> str:
    """The fingerprint of a dataset (what keys cached features and unreadable-image counts); empty
    for None or a dataset that gives none."""
    return dataset.fingerprint if isinstance(dataset, FingerprintedDataset) else ""


class ReadsClassificationData:
    """Mixin of the LightningModules that read classification data (classifiers, test-time tuning):
    the data module through :class:`ClassificationData`, and the dataset each stage reads."""

    def classification_data(self) -> ClassificationData | None:
        """The trainer's data module when it implements :class:`ClassificationData` (else None, with a warning)."""
        return classification_data(self)

    def stage_dataset(self, stage: str) -> Any:
        """The dataset ``stage`` reads, None without classification data or before set-up."""
        dm = self.classification_data()
        return dm.dataset(SPLIT_OF_STAGE[stage]) if dm is not None else None
