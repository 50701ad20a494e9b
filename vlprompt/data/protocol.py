"""The protocol through which a method meets its data: class names one way, preprocessing and
test-time views the other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from vlprompt.data.images import ImageDataset

__all__ = ["ClassificationData"]


@runtime_checkable
class ClassificationData(Protocol):
    """What a classification data module offers a method (FewShotDataModule and
    TestImagesDataModule implement it).

    * ``classnames``: class names by label; the model follows them when evaluating.
    * ``set_preprocess(cfg)``: the model hands over its backbone's image preprocessing.
    * ``set_eval_transform(transform)``: test-time methods replace the test transform by their
      views (None restores the preprocessing).
    * ``train_augmentation``: whether training images are randomly augmented (cached features
      would freeze one view).
    * ``dataset(split)``: the dataset serving ``train``/``val``/``test`` (``predict`` = test), or
      None before set-up; its ``fingerprint`` keys cached image features.
    """

    classnames: list[str]

    def set_preprocess(self, preprocess_cfg: dict[str, Any]) -> None: ...

    def set_eval_transform(self, transform: Callable | None) -> None: ...

    @property
    def train_augmentation(self) -> bool: ...

    def dataset(self, split: str) -> ImageDataset | None: ...
