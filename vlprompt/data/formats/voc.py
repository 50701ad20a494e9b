"""VOC-style multi-class palette masks (``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``,
``ImageSets/Segmentation/<split>.txt``), binarised per class: one sample per (image, class
present), the class name as prompt."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlprompt.data.classnames import check_distinct_classnames, normalize_classname
from vlprompt.data.files import find_image
from vlprompt.data.formats.registry import SegmentationSource, register_format
from vlprompt.data.segmentation.masks import read_index_mask
from vlprompt.data.segmentation.samples import (
    SEGMENTATION_SPLITS,
    VOC_CLASSNAMES,
    VOID_INDEX,
    SegmentationData,
    SegmentationSample,
    check_files_exist,
    check_mask_sizes,
)

__all__ = ["read_voc"]

log = logging.getLogger(__name__)


def _voc_folders(root: Path) -> tuple[Path, Path, Path]:
    """The image, mask and split-file folders of a VOC-style ``root`` (the first two must exist)."""
    image_dir, mask_dir, sets = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            hint = "; it looks like TuneVLSeg's layout: format tunevlseg" if (root / "anns").is_dir() else ""
            raise FileNotFoundError(f"{root} is not a VOC-style folder: {folder} not found{hint}")
    return image_dir, mask_dir, sets


def _voc_classnames(root: Path, classnames: Sequence[str] | None) -> list[str]:
    names = [normalize_classname(c) for c in (VOC_CLASSNAMES if classnames is None else classnames)]
    check_distinct_classnames(names, f"{root} class names")
    if len(names) < 2:
        raise ValueError(f"{root}: give the class names by id, background first (got {names})")
    return names


def _split_ids(root: Path, mask_dir: Path, sets: Path) -> dict[str, list[str]]:
    """Image ids by split, from the split files; without any, every mask is a training sample."""
    split_files = {s: sets / f"{s}.txt" for s in SEGMENTATION_SPLITS}
    if any(f.is_file() for f in split_files.values()):
        return {s: [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
                if f.is_file() else [] for s, f in split_files.items()}
    log.info("%s: no split files under %s; every mask is a training sample", root, sets)
    return {"train": sorted(p.stem for p in mask_dir.glob("*.png")), "val": [], "test": []}


def _classes_present(mask: str, labels: np.ndarray, names: list[str]) -> tuple[list[int], bool]:
    """The class ids in a mask (never background or void) and whether it holds only background
    and void; a class id without a name is an error."""
    values = [int(v) for v in np.unique(labels)]
    present = [v for v in values if v not in (0, VOID_INDEX)]
    unknown = [v for v in present if v >= len(names)]
    if unknown:
        raise ValueError(f"{mask}: class ids {unknown} but only {len(names)} class names are known "
                         f"({names[0]} ... {names[-1]}); pass classnames")
    return present, not present and VOID_INDEX in values


def _read_split(pairs: list[tuple[str, str]], names: list[str], where: str) -> tuple[list[SegmentationSample], list[str]]:
    """The (image, class) samples of a split's (image, mask) pairs, and its masks of background
    and void alone."""
    check_files_exist([p for pair in pairs for p in pair], where)
    samples, sizes, void_only = [], {}, []
    for image, mask in pairs:
        labels = read_index_mask(mask)
        sizes[mask] = (labels.shape[1], labels.shape[0])
        present, only_void = _classes_present(mask, labels, names)
        if only_void:
            void_only.append(mask)
        samples += [SegmentationSample(image, mask, (names[v],), class_index=v) for v in present]
    check_mask_sizes(pairs, where, sizes)
    return samples, void_only


def _log_split(split: str, stems: list[str], samples: list[SegmentationSample], void_only: list[str]) -> None:
    if void_only:
        # VOC voids objects too hard to label, so a few such masks are normal; all of them is
        # what binary 0/255 masks (255 the object) look like here (see _refuse_empty_train).
        log.info("%s split: %d of %d masks hold only background (0) and void (255), e.g. %s; they give no "
                 "sample (255 is void here; binary 0/255 masks belong to format 'tunevlseg')",
                 split, len(void_only), len(stems), void_only[0])
    if stems:
        log.info("%s split: %d images, %d (image, class) samples", split, len(stems), len(samples))


def _refuse_empty_train(root: Path, train_ids: list[str], void_only: list[str]) -> None:
    why = "it lists no images" if not train_ids else "no mask holds a class other than background (0)"
    if train_ids and len(void_only) == len(train_ids):
        why = (f"every mask holds only background (0) and void (255), e.g. {void_only[0]}; in the VOC "
               "format 255 is void, never an object: binary 0/255 masks belong to the tunevlseg format "
               "(format: tunevlseg, images/, masks/, anns/{train,val,test}.json)")
    raise ValueError(f"{root}: the train split has no (image, class) samples: {why}")


def read_voc(root: str | Path, *, classnames: Sequence[str] | None = None) -> dict[str, list[SegmentationSample]]:
    """Read a VOC-style folder: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette
    masks whose pixel values are class ids) and ``ImageSets/Segmentation/{train,val,test}.txt``.

    ``classnames[i]`` names class id ``i`` (default :data:`VOC_CLASSNAMES`). Each mask gives one
    sample per class present in it, its name as the prompt; class 0 (background) and
    :data:`VOID_INDEX` are never a prompt (void is ignored in that class's target). Without split
    files every mask is a training sample; a split whose file is absent is empty. A mask value that
    names no class, a mask of another size than its image, and a train split without samples are
    errors (the last one says why, e.g. binary 0/255 masks, which are read as background and void).
    """
    root = Path(root).expanduser()
    image_dir, mask_dir, sets = _voc_folders(root)
    names = _voc_classnames(root, classnames)
    ids = _split_ids(root, mask_dir, sets)
    splits: dict[str, list[SegmentationSample]] = {}
    void_masks: dict[str, list[str]] = {}  # by split: masks of background and void alone
    for split, stems in ids.items():
        pairs = [(str(find_image(image_dir, stem)), str(mask_dir / f"{stem}.png")) for stem in stems]
        splits[split], void_masks[split] = _read_split(pairs, names, f"{root} ({split} split)")
        _log_split(split, stems, splits[split], void_masks[split])
    if not splits["train"]:
        _refuse_empty_train(root, ids["train"], void_masks["train"])
    return splits


@register_format("voc", task="segmentation")
def read_voc_source(source: SegmentationSource) -> SegmentationData:
    """VOC-style data at ``root``: the class names are the prompts."""
    if source.prompt_index is not None:
        raise ValueError("prompt_index is for format='tunevlseg'")
    samples = read_voc(source.root, classnames=source.classnames)
    names = [normalize_classname(c) for c in (source.classnames or VOC_CLASSNAMES)]
    return SegmentationData(samples, names, free_text_prompts=False)
