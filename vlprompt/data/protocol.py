"""The protocols through which a method meets its data: class names one way, preprocessing and
test-time views the other; seeded datasets whose draws follow the epoch; segmentation data;
image-text episodes for meta-learning.

Methods test these with ``isinstance`` (they are ``runtime_checkable``), never with ``hasattr``:
a data module or dataset says what it offers by having these members, and this file says which
members make up each offer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from vlprompt.data.images import ImageDataset

if TYPE_CHECKING:
    from vlprompt.data.tasks import Task

__all__ = [
    "ClassificationData",
    "EpisodeData",
    "FingerprintedDataset",
    "LabelsOnlyDataset",
    "LoaderWorkers",
    "TrainBatches",
    "MultiTaskData",
    "PreprocessedData",
    "SeededDataset",
    "SegmentationData",
]


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


@runtime_checkable
class MultiTaskData(ClassificationData, Protocol):
    """Classification data made of several tasks (MVLPT; :class:`~vlprompt.data.MultiTaskDataModule`):
    ``tasks`` says which labels belong to which task, task after task."""

    tasks: list[Task]


@runtime_checkable
class PreprocessedData(Protocol):
    """A data module that takes the backbone's image preprocessing (``size``, ``mean``, ``std``,
    ``interpolation``, ...) from the model."""

    def set_preprocess(self, preprocess_cfg: dict[str, Any]) -> None: ...


@runtime_checkable
class FingerprintedDataset(Protocol):
    """A dataset that names what it yields (its samples and preprocessing): the key of cached
    image features and of unreadable-image counts."""

    @property
    def fingerprint(self) -> str: ...


@runtime_checkable
class SeededDataset(Protocol):
    """A dataset whose random draws are a function of the epoch (the model sets it before each
    training epoch) and that can remake the items of a batch drawn for another epoch
    (:func:`~vlprompt.data.images.remake_stale`; returns how many were)."""

    def set_epoch(self, epoch: int) -> None: ...

    def remake_stale(self, batch: dict[str, Any], epoch: int) -> int: ...


@runtime_checkable
class LabelsOnlyDataset(Protocol):
    """A dataset that can yield labels and indices without reading images (training whose image
    features come from a feature bank)."""

    def set_labels_only(self, labels_only: bool) -> None: ...


@runtime_checkable
class LoaderWorkers(Protocol):
    """A data module that says how many loader processes it uses (work done beside its loaders,
    such as filling a feature bank, uses as many)."""

    num_workers: int


@runtime_checkable
class TrainBatches(Protocol):
    """A data module whose training loader can drop its last incomplete batch when the method
    asks for it (Dassl's loader does, so the paper recipes do: ``PromptModule(drop_last=True)``)."""

    def request_drop_last(self, drop: bool) -> None: ...


@runtime_checkable
class SegmentationData(Protocol):
    """What a segmentation data module offers a method (SegmentationDataModule implements it):
    it takes the backbone's preprocessing, says whether training images are randomly augmented,
    and serves a fingerprinted dataset per split (``predict`` = test; None before set-up)."""

    def set_preprocess(self, preprocess_cfg: dict[str, Any]) -> None: ...

    @property
    def train_augmentation(self) -> bool: ...

    def dataset(self, split: str) -> FingerprintedDataset | None: ...


@runtime_checkable
class EpisodeData(Protocol):
    """What meta-learning from image-text pairs needs of its data module
    (:class:`~vlprompt.data.ImageTextPairsDataModule`): the pairs to embed and cluster, episodes
    drawn by a sampler the model builds, seeded by epoch, and episodes fetched for another epoch
    redrawn (returns how many were)."""

    captions: Sequence[str]
    unreadable: int

    def set_preprocess(self, preprocess_cfg: dict[str, Any]) -> None: ...

    def embedding_loader(self) -> Iterable[Any]: ...

    def set_episodes(self, episodes: Any, with_images: bool) -> None: ...

    def set_epoch(self, epoch: int) -> None: ...

    def remake_stale_episodes(self, batch: list[dict[str, Any]], epoch: int) -> int: ...
