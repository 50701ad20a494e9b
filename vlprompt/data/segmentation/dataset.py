"""``SegmentationDataset``: images, binary targets and prompts, loaded, checked and augmented
together (albumentations), and the collate function of its batches."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from vlprompt.data.files import UnreadableImageError
from vlprompt.data.images import DEFAULT_PREPROCESS, OnError, load_rgb, remake_stale
from vlprompt.data.segmentation.masks import read_binary_mask, read_index_mask
from vlprompt.data.segmentation.samples import VOID_INDEX, SegmentationSample

__all__ = ["INTERPOLATIONS", "Augmentation", "SegmentationDataset", "collate_segmentation", "tunevlseg_augmentation"]

log = logging.getLogger(__name__)

#: image interpolations understood here (cv2's names: INTER_CUBIC, INTER_LINEAR, INTER_NEAREST)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def _albumentations() -> tuple[Any, Any]:
    """albumentations and cv2, imported on first use: they take seconds to import, which
    classification users of :mod:`vlprompt.data` should not pay."""
    # albumentations asks PyPI for a newer version at import unless told not to; a library must
    # not make network calls (vlprompt runs offline), and the user's own setting wins.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations
    import cv2

    return albumentations, cv2


#: ``crop`` (random resized crop, optional flips) or ``tunevlseg`` (TuneVLSeg's affine and
#: brightness/contrast); see :class:`SegmentationDataset`.
Augmentation = Literal["crop", "tunevlseg"]


def tunevlseg_augmentation(interpolation: int) -> list[Any]:
    """TuneVLSeg's random training transforms after its resize (``train_transforms`` of its
    experiment configs), for albumentations 2: ``Affine`` (p 0.2) and ``RandomBrightnessContrast``
    (p 0.2); ``interpolation``: cv2's code for the image (masks: nearest)."""
    A, cv2 = _albumentations()
    return [
        A.Affine(scale=(0.98, 1.02), translate_percent=(-0.02, 0.02), rotate=(-5, 5), interpolation=interpolation,
                 mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_REPLICATE, p=0.2),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.2),
    ]


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


class SegmentationDataset(Dataset):
    """Images, binary targets and prompts for a segmentation model.

    Items are dicts: ``image`` (float ``[3, H, W]``, normalised), ``mask`` (float ``[1, H, W]`` in
    {0, 1}), ``ignore`` (bool ``[1, H, W]``, void pixels; only when the dataset holds palette-mask
    samples or the item's mask has void), ``prompt`` (str), ``index``, ``class_index`` (-1 for a
    binary-mask sample), ``orig_size`` ((h, w) before resizing) and ``image_path``. An unreadable
    image or mask file yields ``{"unreadable": index}`` with ``on_error="skip"`` (see
    :func:`collate_segmentation`). A mask that is not binary (:func:`read_binary_mask`), or whose
    size differs from its image's, is an error either way.

    Args:
        samples: what to load.
        size: output size, an int or ``(height, width)``.
        mean, std: normalisation of the 0..1 image.
        train: the training split: random augmentation (when ``augment``) and a random prompt.
        augment: random augmentation of the training split, as ``augmentation`` says.
        augmentation: ``crop``: random resized crop (``crop_scale``) and, with ``hflip``,
            horizontal flips; ``tunevlseg``: TuneVLSeg's training transforms (its experiment
            configs): resize, then with probability 0.2 an affine map (scale 0.98-1.02, shift
            +-2%, rotation +-5 degrees, ``interpolation``, borders replicated) and with probability
            0.2 brightness and contrast changes of up to 10% (its PadIfNeeded and
            CropNonEmptyMaskIfExists at the resized size change nothing and are left out).
        interpolation: ``bicubic``/``bilinear``/``nearest`` for enlarging the image; masks always
            use nearest neighbour.
        area_downscale: shrink images by averaging pixel areas (else with ``interpolation`` too,
            as TuneVLSeg resizes with cv2's cubic interpolation both ways).
        seed: makes training draws a function of ``(seed, epoch, index)`` (see :meth:`set_epoch`).
            None draws from torch's random state, which Lightning's ``seed_everything`` and its
            per-worker seeding make reproducible.
    """

    def __init__(
        self,
        samples: Sequence[SegmentationSample],
        *,
        size: int | tuple[int, int] = 352,
        mean: Sequence[float] = DEFAULT_PREPROCESS["mean"],
        std: Sequence[float] = DEFAULT_PREPROCESS["std"],
        train: bool = False,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        interpolation: str = "bicubic",
        on_error: OnError = "skip",
        seed: int | None = None,
        augmentation: Augmentation = "crop",
        area_downscale: bool = True,
    ) -> None:
        if augmentation not in ("crop", "tunevlseg"):
            raise ValueError(f"augmentation must be 'crop' or 'tunevlseg', not {augmentation!r}")
        self.augmentation, self.area_downscale = augmentation, area_downscale
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")
        self.samples = list(samples)
        self.train, self.augment, self.on_error, self.seed = train, augment, on_error, seed
        self.crop_scale, self.hflip = (float(crop_scale[0]), float(crop_scale[1])), hflip
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # seen by loader workers
        #: whether every item carries an ``ignore`` mask (any sample of a palette mask); an item whose
        #: binary mask has a void band carries one anyway
        self.has_void = any(s.class_index is not None for s in self.samples)
        digest = hashlib.sha256()
        for s in self.samples:
            digest.update(f"{s.image}\0{s.mask}\0{s.class_index}\0{chr(31).join(s.prompts)}\n".encode())
        self._samples_digest = digest.hexdigest()
        self.set_preprocess(size=size, mean=mean, std=std, interpolation=interpolation)

    @property
    def random_augmentation(self) -> bool:
        """Whether loads are randomly augmented (training split with ``augment``)."""
        return self.train and self.augment

    def set_preprocess(
        self, *, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic"
    ) -> None:
        """Use another output size and normalisation (a backbone's preprocessing)."""
        self.size = _as_hw(size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.interpolation = interpolation
        self.transform = self._build_transform()

    def _build_transform(self) -> Callable[..., dict[str, Any]]:
        A, cv2 = _albumentations()
        h, w = self.size
        interp = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}[self.interpolation]
        resize_args = {"interpolation": interp, "mask_interpolation": cv2.INTER_NEAREST,
                       "area_for_downscale": "image" if self.area_downscale else None}
        steps: list[Any]
        if self.random_augmentation and self.augmentation == "crop":
            steps = [A.RandomResizedCrop(size=(h, w), scale=self.crop_scale, **resize_args)]
            if self.hflip:
                steps.append(A.HorizontalFlip(p=0.5))
        else:
            steps = [A.Resize(height=h, width=w, **resize_args)]
        if self.random_augmentation and self.augmentation == "tunevlseg":
            steps += tunevlseg_augmentation(interp)
        steps.append(A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0))
        return A.Compose(steps)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """With a ``seed``, the epoch whose draws ``__getitem__`` makes (shared with loader
        worker processes)."""
        self._epoch.fill_(int(epoch))

    def remake_stale(self, batch: dict[str, Any], epoch: int) -> int:
        """See :func:`~vlprompt.data.images.remake_stale`."""
        return remake_stale(batch, epoch, self.item, collate_segmentation)

    @property
    def fingerprint(self) -> str:
        """Identity of what this dataset yields: its samples, in order, and its preprocessing."""
        key = [self.size, self.mean, self.std, self.interpolation, self.random_augmentation, self.crop_scale,
               self.hflip, self.train]
        key += [] if (self.augmentation, self.area_downscale) == ("crop", True) else [self.augmentation, self.area_downscale]
        key = json.dumps(key, default=repr)
        return hashlib.sha256(f"{self._samples_digest}|{key}".encode()).hexdigest()[:20]

    def __len__(self) -> int:
        return len(self.samples)

    def _draws(self, index: int, epoch: int) -> tuple[np.random.Generator, random.Random]:
        if self.seed is None:
            seq = np.random.SeedSequence(int(torch.randint(0, 2**62, ()).item()))
        else:
            seq = np.random.SeedSequence([self.seed, epoch, index])
        return np.random.default_rng(seq), random.Random(int(seq.generate_state(1, np.uint64)[0]))

    def load_mask(self, sample: SegmentationSample) -> np.ndarray:
        """The sample's target as uint8: 1 inside, 0 outside, :data:`VOID_INDEX` for void pixels."""
        if sample.class_index is not None:
            ids = read_index_mask(sample.mask)
            out = (ids == sample.class_index).astype(np.uint8)
            out[ids == VOID_INDEX] = VOID_INDEX
            return out
        return read_binary_mask(sample.mask)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index, self.epoch)

    def item(self, index: int, epoch: int) -> dict[str, Any]:
        """Item ``index`` as drawn at ``epoch`` (the epoch matters only for seeded training draws)."""
        sample = self.samples[index]
        try:
            image = np.asarray(load_rgb(sample.image))
            target = self.load_mask(sample)
        except UnreadableImageError as err:
            if self.on_error == "raise":
                raise
            log.warning("skipping %s", err)
            return {"unreadable": index}
        if target.shape != image.shape[:2]:
            raise ValueError(f"{sample.mask}: mask is {target.shape[1]}x{target.shape[0]} (WxH) but its image "
                             f"{sample.image} is {image.shape[1]}x{image.shape[0]}")
        prompt = sample.prompts[0]
        if self.train:
            np_rng, py_rng = self._draws(index, epoch)
            self.transform.set_random_state(np_rng, py_rng)
            if len(sample.prompts) > 1:
                prompt = sample.prompts[int(np_rng.integers(len(sample.prompts)))]
        out = self.transform(image=image, mask=target)
        transformed = out["mask"]
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            "mask": torch.from_numpy(transformed == 1).float().unsqueeze(0),
            "prompt": prompt,
            "index": index,
            "class_index": -1 if sample.class_index is None else sample.class_index,
            "orig_size": (int(image.shape[0]), int(image.shape[1])),
            "image_path": sample.image,
        }
        if self.has_void or (target == VOID_INDEX).any():  # a binary mask with VOC's void band has some too
            item["ignore"] = torch.from_numpy(transformed == VOID_INDEX).unsqueeze(0)
        if self.train and self.seed is not None:
            item["epoch"] = epoch  # which epoch's draws: see remake_stale
        return item


def collate_segmentation(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`SegmentationDataset` items, dropping unreadable ones (their indices go to
    ``batch["skipped"]``, as :func:`~vlprompt.data.images.collate_skipping` does). Unlike
    ``default_collate`` it keeps ``prompt``/``image_path`` as lists of strings and ``orig_size`` as a
    list of ``(h, w)`` tuples. An all-unreadable batch has ``image`` None."""
    kept = [it for it in items if "unreadable" not in it]
    skipped = [int(it["unreadable"]) for it in items if "unreadable" in it]
    if not kept:
        return {"image": None, "mask": None, "prompt": [], "index": None, "skipped": skipped}
    batch: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in kept]),
        "mask": torch.stack([it["mask"] for it in kept]),
        "prompt": [it["prompt"] for it in kept],
        "index": torch.tensor([it["index"] for it in kept], dtype=torch.long),
        "class_index": torch.tensor([it.get("class_index", -1) for it in kept], dtype=torch.long),
        "orig_size": [tuple(it["orig_size"]) for it in kept],
        "image_path": [it["image_path"] for it in kept],
        "skipped": skipped,
    }
    if all("epoch" in it for it in kept):
        batch["epoch"] = torch.tensor([it["epoch"] for it in kept], dtype=torch.long)
    if any("ignore" in it for it in kept):
        batch["ignore"] = torch.stack([it.get("ignore", torch.zeros_like(it["mask"], dtype=torch.bool)) for it in kept])
    return batch
