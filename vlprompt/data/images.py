"""Image datasets that survive bad files, and the transforms handed over by the backbone."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2 as T

from vlprompt.data.sources import Sample

__all__ = ["ImageDataset", "OnError", "build_eval_transform", "build_train_transform", "collate_skipping"]

log = logging.getLogger(__name__)

OnError = Literal["skip", "raise"]

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


class UnreadableImageError(OSError):
    """An image file that cannot be opened or decoded."""


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, turning every decoding failure into one clear error."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


class ImageDataset(Dataset):
    """Labelled images read from disk.

    With ``on_error="skip"`` an unreadable image yields ``None``; :func:`collate_skipping` drops
    it from the batch and reports the count under ``"skipped"`` so the method can log the total.
    Items are dicts with ``image``, ``label`` and ``index`` (position in this dataset, the key of
    cached image features).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable | None = None,
        on_error: OnError = "skip",
        cache_key: str = "",
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        self.samples = list(samples)
        self.transform = transform
        self.on_error = on_error
        #: Names this exact sample list, so cached image features are never reused across splits.
        self.cache_key = cache_key

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.samples[index]
        try:
            image = load_rgb(sample.path)
        except UnreadableImageError as err:
            if self.on_error == "raise":
                raise
            log.warning("skipping %s", err)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": sample.label, "index": index}


def collate_skipping(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Collate, dropping the ``None`` items of unreadable images and counting them."""
    kept = [it for it in items if it is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return {"image": None, "label": None, "index": None, "skipped": skipped}
    batch = default_collate(kept)
    batch["skipped"] = skipped
    return batch


def build_eval_transform(preprocess_cfg: dict[str, Any]) -> Callable:
    """The backbone's own evaluation preprocessing (open_clip's, from its preprocess config)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    fields = {k: v for k, v in preprocess_cfg.items() if k in PreprocessCfg.__dataclass_fields__}
    return image_transform_v2(PreprocessCfg(**fields), is_train=False)


def build_train_transform(
    preprocess_cfg: dict[str, Any],
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
    augmix: bool = False,
) -> Callable:
    """Random resized crop and horizontal flip (CoOp's augmentation; TPT's views), optionally
    AugMix, then the backbone's normalisation."""
    size = preprocess_cfg.get("size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    interpolation = _INTERPOLATION.get(preprocess_cfg.get("interpolation", "bicubic"), T.InterpolationMode.BICUBIC)
    steps: list[Callable] = [T.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.ToImage())
    if augmix:
        steps.append(T.AugMix(severity=1))
    steps += [
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(preprocess_cfg["mean"]), std=list(preprocess_cfg["std"])),
    ]
    return T.Compose(steps)
