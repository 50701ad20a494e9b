"""What segmentation formats read into: image-mask-prompt samples by split, and the checks every
layout shares (files present, masks the size of their images)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = [
    "SEGMENTATION_SPLITS",
    "VOC_CLASSNAMES",
    "VOC_VOID_COLOUR",
    "VOID_INDEX",
    "SegmentationData",
    "SegmentationSample",
    "check_files_exist",
    "check_mask_sizes",
]

SEGMENTATION_SPLITS = ("train", "val", "test")

#: Pixel value of VOC's void/boundary label: never a class, ignored by losses and metrics.
VOID_INDEX = 255

#: PASCAL VOC's 21 classes by index (0: background), written as words rather than VOC's
#: identifiers (``diningtable``, ``pottedplant``, ``tvmonitor``) since they become text prompts.
VOC_CLASSNAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
    "train", "tv monitor",
)

#: The colour VOC's palette paints its void band (index 255) with.
VOC_VOID_COLOUR = (224, 224, 192)

_SHOW_MISSING = 5


@dataclass(frozen=True)
class SegmentationSample:
    """One image, its mask and the prompts that describe the masked region.

    ``class_index`` is set for a class of a multi-class (palette) mask: the binary target is
    ``mask == class_index``. Without it the mask file itself is binary.
    """

    image: str
    mask: str
    prompts: tuple[str, ...]
    class_index: int | None = None



@dataclass
class SegmentationData:
    """What a segmentation format reads: the samples by split, the class names of class-mask data
    (None for free-text prompts) and whether the prompts are free text (which may name a side,
    e.g. "left", so horizontal flips are off by default)."""

    samples: dict[str, list[SegmentationSample]]
    classnames: list[str] | None = None
    free_text_prompts: bool = True


def check_files_exist(paths: Sequence[str], where: str) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        shown = "\n  - ".join(missing[:_SHOW_MISSING])
        more = f"\n  ... and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
        raise FileNotFoundError(f"{where}: {len(missing)} image or mask files are missing:\n  - {shown}{more}")


def _header_size(path: str) -> tuple[int, int] | None:
    """An image file's ``(width, height)`` from its header (nothing decoded); None when unreadable
    (loading skips or raises on it later, as ``on_error`` says)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def check_mask_sizes(pairs: Sequence[tuple[str, str]], where: str,
                 mask_sizes: Mapping[str, tuple[int, int]] | None = None) -> None:
    """Refuse masks whose size differs from their image's, naming both files and both sizes.
    ``mask_sizes``: sizes already known (masks decoded anyway), else read from the headers."""
    wrong = []
    for image, mask in dict.fromkeys(pairs):  # a pair listed twice (several prompts) is read once
        mask_size = (mask_sizes or {}).get(mask) or _header_size(mask)
        image_size = _header_size(image)
        if mask_size is not None and image_size is not None and mask_size != image_size:
            wrong.append(f"mask {mask} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image} is "
                         f"{image_size[0]}x{image_size[1]}")
    if wrong:
        more = f"; ... and {len(wrong) - _SHOW_MISSING} more" if len(wrong) > _SHOW_MISSING else ""
        raise ValueError(f"{where}: {len(wrong)} masks differ in size from their images: "
                         f"{'; '.join(wrong[:_SHOW_MISSING])}{more}")
