"""``SegmentationDataModule``: train/val/test/predict loaders of image-text-mask data in any
registered segmentation format."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from vlprompt.data.formats import SegmentationSource, get_format
from vlprompt.data.images import DEFAULT_PREPROCESS, OnError, SplitLoaders
from vlprompt.data.segmentation.dataset import INTERPOLATIONS, Augmentation, SegmentationDataset, collate_segmentation
from vlprompt.data.segmentation.samples import SegmentationSample

__all__ = ["SegmentationDataModule", "SegmentationFormat"]

log = logging.getLogger(__name__)

#: The segmentation formats shipped with vlprompt (any registered one is accepted).
SegmentationFormat = str


class SegmentationDataModule(SplitLoaders, pl.LightningDataModule):
    """Train/val/test/predict loaders of image-text-mask data (TuneVLSeg's task).

    Reads ``root`` in ``format`` ``tunevlseg`` (:func:`~vlprompt.data.formats.tunevlseg.read_tunevlseg`),
    ``voc`` (:func:`~vlprompt.data.formats.voc.read_voc`) or any other registered segmentation
    format (:func:`~vlprompt.data.formats.register_format`) at construction, so a bad folder fails at once. The model hands over its
    backbone's preprocessing with :meth:`set_preprocess` (size, mean, std, interpolation), as with
    :class:`~vlprompt.data.FewShotDataModule`. Evaluation loaders split the data over DDP processes
    without padding. Predict serves the test split; without a test split, val is tested (logged:
    VOC's test masks are not public).

    Args:
        root: the dataset folder.
        format: ``tunevlseg``, ``voc`` or another registered segmentation format.
        classnames: VOC class names by id (default :data:`~vlprompt.data.segmentation.VOC_CLASSNAMES`); exposed as
            :attr:`classnames` (None for TuneVLSeg data, whose prompts are free text).
        prompt_index: TuneVLSeg only: keep the prompts of key ``p<i>`` (all keys when None).
        size, mean, std, interpolation: preprocessing until the model sets its own.
        augment: random augmentation for training (never for val/test), as ``augmentation`` says:
            ``crop`` (random resized crop, ``crop_scale``, and flips) or ``tunevlseg`` (TuneVLSeg's
            affine and brightness/contrast transforms; :class:`SegmentationDataset`).
        area_downscale: shrink by averaging pixel areas (False: with ``interpolation``, as TuneVLSeg).
        hflip: horizontal flips in training; None: on for class-name prompts (``voc``), off for
            free-text ones (``tunevlseg``; TuneVLSeg leaves flips out: its prompts may name a side,
            e.g. "left").
        on_error: ``skip`` unreadable images (logged and counted in ``batch["skipped"]``) or ``raise``.
        seed: see :class:`SegmentationDataset` (None: Lightning's seeding governs the draws).
    """

    collate_fn = staticmethod(collate_segmentation)

    def __init__(
        self,
        root: str,
        *,
        format: SegmentationFormat = "tunevlseg",
        classnames: list[str] | None = None,
        prompt_index: int | None = None,
        size: int | tuple[int, int] = 352,
        mean: tuple[float, float, float] = DEFAULT_PREPROCESS["mean"],
        std: tuple[float, float, float] = DEFAULT_PREPROCESS["std"],
        interpolation: str = "bicubic",
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 2,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool | None = None,
        on_error: OnError = "skip",
        seed: int | None = None,
        augmentation: Augmentation = "crop",
        area_downscale: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.format = format
        data = get_format(format, "segmentation").read(
            SegmentationSource(self.root, classnames=classnames, prompt_index=prompt_index))
        self.samples: dict[str, list[SegmentationSample]] = data.samples
        self.classnames: list[str] | None = data.classnames
        self.preprocess_cfg: dict[str, Any] = {"size": size, "mean": tuple(mean), "std": tuple(std),
                                               "interpolation": interpolation}
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.augment, self.crop_scale, self.on_error, self.seed = augment, tuple(crop_scale), on_error, seed
        self.hflip = (not data.free_text_prompts) if hflip is None else hflip
        self.augmentation, self.area_downscale = augmentation, area_downscale
        self.datasets: dict[str, SegmentationDataset] = {}

    # -- preprocessing handed over by the model -------------------------------------------------
    def set_preprocess(self, preprocess_cfg: dict[str, Any]) -> None:
        """Use the backbone's ``size``, ``mean``, ``std`` and ``interpolation`` (keys it lacks keep
        their values; ``resize_mode`` is not followed: segmentation resizes without cropping)."""
        cfg = dict(self.preprocess_cfg)
        cfg.update({k: preprocess_cfg[k] for k in ("size", "mean", "std", "interpolation") if k in preprocess_cfg})
        if cfg["interpolation"] not in INTERPOLATIONS:
            log.info("interpolation %r not supported here; using bicubic", cfg["interpolation"])
            cfg["interpolation"] = "bicubic"
        self.preprocess_cfg = cfg
        for ds in self.datasets.values():
            ds.set_preprocess(**self._preprocess_args())

    def _preprocess_args(self) -> dict[str, Any]:
        cfg = self.preprocess_cfg
        return {"size": cfg["size"], "mean": cfg["mean"], "std": cfg["std"], "interpolation": cfg["interpolation"]}

    @property
    def train_augmentation(self) -> bool:
        """Whether training images are randomly augmented (cached features would freeze one view)."""
        return self.augment

    def dataset(self, split: str) -> SegmentationDataset | None:
        """The dataset serving ``split`` (``predict`` = test), None before set-up."""
        return self.datasets.get("test" if split == "predict" else split)

    def split_samples(self, split: str) -> list[SegmentationSample]:
        """The samples of ``split``; test falls back to val when the data has no test split."""
        if split == "test" and not self.samples["test"] and self.samples["val"]:
            log.warning("%s has no test split; testing on the validation split", self.root)
            return self.samples["val"]
        return self.samples[split]

    # -- Lightning hooks -------------------------------------------------------------------------
    def build_dataset(self, split: str, samples: list) -> SegmentationDataset:
        log.info("%s: %d samples", split, len(samples))
        return SegmentationDataset(samples, train=split == "train", augment=self.augment, crop_scale=self.crop_scale,
                                   hflip=self.hflip, on_error=self.on_error, seed=self.seed, augmentation=self.augmentation,
                                   area_downscale=self.area_downscale, **self._preprocess_args())
