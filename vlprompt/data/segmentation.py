"""Image-text-mask data for vision-language segmentation models (CLIPSeg, CRIS ...).

Two layouts are read into lists of :class:`SegmentationSample` per split:

- TuneVLSeg's (Adhikari et al., ACCV 2024; github naamiinepal/tunevlseg): ``root/images/``,
  ``root/masks/`` and ``root/anns/{train,val,test}.json``, each a list of
  ``{"img_name", "mask_name", "prompts": {"p0": ..., "p1": ...}}`` with binary masks
  (:func:`read_tunevlseg`);
- VOC-style multi-class palette masks (``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``,
  ``ImageSets/Segmentation/<split>.txt``), binarised per class: one sample per (image, class
  present), the class name as prompt (:func:`read_voc`).

:class:`SegmentationDataset` loads, checks and transforms image and mask together (albumentations);
:class:`SegmentationDataModule` serves the loaders.

Decisions (read these before writing a loss or a metric):

- **Targets and void.** ``mask`` is a float ``{0, 1}`` tensor. VOC's void/boundary pixels (255) are
  0 in ``mask`` and True in a separate boolean ``ignore`` tensor; losses and metrics drop those
  pixels. ``ignore`` is in the item whenever the dataset holds any palette-mask sample (all False
  for a binary-mask sample then) or the item's own mask has void pixels, and absent for purely
  binary data (:func:`collate_segmentation` gives the items of a batch that lack it an all-False one).
- **Reading a binary (TuneVLSeg) mask** (:func:`read_binary_mask`): a grayscale mask holds
  ``{0, 1}`` or ``{0, 255}``, 255 the object. In a palette (``P``) mask the values are indices: 255
  is the object when the palette paints it white (a 0/255 mask saved with a grey palette) and VOC's
  void band, ignored, when it paints it VOC's void colour (224, 224, 192); any other colour is
  refused. A mask with an alpha channel is read from its alpha channel when the alpha varies and
  the colour does not (the mask drawn in transparency only); when both vary they must mark the
  same pixels. A value set that fits neither is refused, naming the file.
- **Sizes** of every image and its mask are compared when the data is read (from the files'
  headers, nothing decoded), so a mismatch fails before training instead of mid-epoch.
- **Prompts.** Evaluation always uses a sample's first prompt (deterministic). Training draws one
  of its prompts at random for every load. ``prompt_index`` keeps the prompts of one key
  (``p<i>``), as TuneVLSeg's does; where TuneVLSeg's random mode (``-1``) draws among ``p1, p2 ...``
  at every split, vlprompt draws among a sample's non-empty prompts in training only.
- **Interpolation.** The image is resized with the backbone's interpolation (bicubic by default)
  when enlarged and by pixel-area averaging when shrunk (cv2 has no anti-aliasing flag; area
  averaging is its anti-aliased downscale, as torchvision's ``antialias=True`` is for open_clip);
  the mask is always resized with nearest neighbour, so it stays binary and void stays void.
- **Geometry.** Images are resized to ``size`` without keeping the aspect ratio (as TuneVLSeg and
  CLIPSeg do) and never centre-cropped: a crop would cut away mask pixels the metrics need.
  ``orig_size`` lets a method resize its prediction back.
- **Augmentation** is applied to the training split only, never to val/test (TuneVLSeg's configs
  allow any transform per split; vlprompt fixes this on purpose). It is a random resized crop
  and, where prompts cannot name a side, a horizontal flip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vlprompt.data.classnames import check_distinct_classnames, normalize_classname
from vlprompt.data.datamodule import DEFAULT_PREPROCESS
from vlprompt.data.images import OnError, SplitLoaders, UnreadableImageError, load_rgb, remake_stale
from vlprompt.data.files import find_image

__all__ = [
    "SEGMENTATION_SPLITS",
    "VOC_CLASSNAMES",
    "VOC_VOID_COLOUR",
    "VOID_INDEX",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SegmentationFormat",
    "SegmentationSample",
    "collate_segmentation",
    "read_binary_mask",
    "read_tunevlseg",
    "read_voc",
]

log = logging.getLogger(__name__)

SegmentationFormat = Literal["tunevlseg", "voc"]

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

#: image interpolations understood here (cv2's names: INTER_CUBIC, INTER_LINEAR, INTER_NEAREST)
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

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


# -- TuneVLSeg layout --------------------------------------------------------------------------------
def _prompt_keys(prompts: Mapping[str, Any]) -> list[str]:
    """``p0, p1, ..., p10`` by number (TuneVLSeg sorts them so), other keys after, as written."""
    numbered = sorted((int(m.group(1)), k) for k in prompts if (m := re.fullmatch(r"p(\d+)", str(k))))
    return [k for _, k in numbered] + [k for k in prompts if not re.fullmatch(r"p\d+", str(k))]


def _entry_prompts(raw: Any, where: str, prompt_index: int | None) -> tuple[str, ...]:
    """The prompts of one annotation entry, in key order, flattened; ``where`` names the entry."""
    if isinstance(raw, str) or (isinstance(raw, Sequence) and not isinstance(raw, Mapping)):
        if prompt_index is not None:
            raise ValueError(f"{where}: prompt_index={prompt_index} needs prompts keyed p0, p1, ...; found a list")
        groups = [("prompts", raw)]
    elif isinstance(raw, Mapping):
        if prompt_index is not None:
            key = f"p{prompt_index}"
            if key not in raw:
                raise ValueError(f"{where}: no prompt {key!r} (has {', '.join(map(str, raw))})")
            groups = [(key, raw[key])]
        else:
            groups = [(k, raw[k]) for k in _prompt_keys(raw)]
    else:
        raise ValueError(f"{where}: 'prompts' must be a mapping p0, p1, ... or a list, not {type(raw).__name__}")
    out: list[str] = []
    for key, value in groups:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{where}: prompt {key!r} must be a string or a list of strings, not {value!r}")
        for text in texts:
            if text.strip():
                out.append(text.strip())
            # TuneVLSeg's datasets keep p0 as the empty prompt (its random draw skips p0); a
            # text prompt cannot be empty, so that one is dropped. Any other empty one is a mistake.
            elif not (key == "p0" and isinstance(value, str) and prompt_index is None):
                raise ValueError(f"{where}: prompt {key!r} is empty ({value!r})")
    if not out:
        raise ValueError(f"{where}: no non-empty prompt")
    return tuple(out)


def _check_files_exist(paths: Sequence[str], where: str) -> None:
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


def _check_sizes(pairs: Sequence[tuple[str, str]], where: str,
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


def read_tunevlseg(root: str | Path, *, prompt_index: int | None = None) -> dict[str, list[SegmentationSample]]:
    """Read TuneVLSeg's layout: ``root/anns/{train,val,test}.json`` over ``root/images`` and
    ``root/masks``. Each entry's ``prompts`` maps ``p<i>`` to a string or a list of strings (as in
    TuneVLSeg; a plain list is accepted too); they are kept in key order, so ``p1`` comes first when
    ``p0`` is TuneVLSeg's empty prompt. ``prompt_index`` keeps only the prompts of ``p<i>``.

    ``train.json`` is required; a missing ``val.json``/``test.json`` gives an empty split. Empty
    prompts (other than an empty ``p0``), missing image or mask files and masks whose size differs
    from their image's (read from the file headers) are errors.
    """
    root = Path(root).expanduser()
    anns, images, masks = root / "anns", root / "images", root / "masks"
    if not (anns / "train.json").is_file():
        hint = "; it looks like VOC's layout: format voc" if (root / "JPEGImages").is_dir() else ""
        raise FileNotFoundError(
            f"{root} is not in TuneVLSeg's layout: {anns / 'train.json'} not found "
            f"(expected images/, masks/ and anns/{{train,val,test}}.json){hint}")
    splits: dict[str, list[SegmentationSample]] = {}
    for split in SEGMENTATION_SPLITS:
        path = anns / f"{split}.json"
        if not path.is_file():
            log.info("%s: no %s split (%s not found)", root, split, path.name)
            splits[split] = []
            continue
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of entries, found {type(entries).__name__}")
        samples = []
        for i, entry in enumerate(entries):
            where = f"{path}: entry {i}"
            if not isinstance(entry, Mapping) or not all(k in entry for k in ("img_name", "mask_name", "prompts")):
                raise ValueError(f"{where}: expected keys img_name, mask_name and prompts, found {entry!r:.200}")
            where += f" ({entry['img_name']})"
            prompts = _entry_prompts(entry["prompts"], where, prompt_index)
            samples.append(SegmentationSample(str(images / entry["img_name"]), str(masks / entry["mask_name"]), prompts))
        _check_files_exist([p for s in samples for p in (s.image, s.mask)], str(path))
        _check_sizes([(s.image, s.mask) for s in samples], str(path))
        splits[split] = samples
    if not splits["train"]:
        raise ValueError(f"{anns / 'train.json'} lists no samples")
    return splits


# -- VOC layout --------------------------------------------------------------------------------------
def _read_index_mask(path: str) -> np.ndarray:
    """Class ids of a palette (``P``) or grayscale (``L``) mask, without colour conversion."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise ValueError(
                    f"{path}: a {img.mode} image; a class mask must be a palette (P) or grayscale (L) "
                    "image of class indices (a mask rendered in colour cannot be read as class ids)")
            return np.asarray(img).copy()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read mask {path}: {err}") from err


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
    image_dir, mask_dir, sets = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            hint = "; it looks like TuneVLSeg's layout: format tunevlseg" if (root / "anns").is_dir() else ""
            raise FileNotFoundError(f"{root} is not a VOC-style folder: {folder} not found{hint}")
    names = [normalize_classname(c) for c in (VOC_CLASSNAMES if classnames is None else classnames)]
    check_distinct_classnames(names, f"{root} class names")
    if len(names) < 2:
        raise ValueError(f"{root}: give the class names by id, background first (got {names})")
    split_files = {s: sets / f"{s}.txt" for s in SEGMENTATION_SPLITS}
    if any(f.is_file() for f in split_files.values()):
        ids = {s: [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
               if f.is_file() else [] for s, f in split_files.items()}
    else:
        log.info("%s: no split files under %s; every mask is a training sample", root, sets)
        ids = {"train": sorted(p.stem for p in mask_dir.glob("*.png")), "val": [], "test": []}
    splits: dict[str, list[SegmentationSample]] = {}
    void_masks: dict[str, list[str]] = {}  # by split: masks of background and void alone
    for split, stems in ids.items():
        pairs = [(str(find_image(image_dir, stem)), str(mask_dir / f"{stem}.png")) for stem in stems]
        _check_files_exist([p for pair in pairs for p in pair], f"{root} ({split} split)")
        samples, sizes, void_only = [], {}, []
        for image, mask in pairs:
            labels = _read_index_mask(mask)
            sizes[mask] = (labels.shape[1], labels.shape[0])
            values = [int(v) for v in np.unique(labels)]
            present = [v for v in values if v not in (0, VOID_INDEX)]
            unknown = [v for v in present if v >= len(names)]
            if unknown:
                raise ValueError(f"{mask}: class ids {unknown} but only {len(names)} class names are known "
                                 f"({names[0]} ... {names[-1]}); pass classnames")
            if not present and VOID_INDEX in values:
                void_only.append(mask)
            samples += [SegmentationSample(image, mask, (names[v],), class_index=v) for v in present]
        _check_sizes(pairs, f"{root} ({split} split)", sizes)
        splits[split] = samples
        void_masks[split] = void_only
        if void_only:
            # VOC voids objects too hard to label, so a few such masks are normal; all of them is
            # what binary 0/255 masks (255 the object) look like here (see the error below).
            log.info("%s split: %d of %d masks hold only background (0) and void (255), e.g. %s; they give no "
                     "sample (255 is void here; binary 0/255 masks belong to format 'tunevlseg')",
                     split, len(void_only), len(pairs), void_only[0])
        if stems:
            log.info("%s split: %d images, %d (image, class) samples", split, len(stems), len(samples))
    if not splits["train"]:
        why = "it lists no images" if not ids["train"] else "no mask holds a class other than background (0)"
        if ids["train"] and len(void_masks["train"]) == len(ids["train"]):
            why = (f"every mask holds only background (0) and void (255), e.g. {void_masks['train'][0]}; in the VOC "
                   "format 255 is void, never an object: binary 0/255 masks belong to the tunevlseg format "
                   "(format: tunevlseg, images/, masks/, anns/{train,val,test}.json)")
        raise ValueError(f"{root}: the train split has no (image, class) samples: {why}")
    return splits


# -- binary masks ----------------------------------------------------------------------------------
def _mask_channel(img: Image.Image, path: str) -> np.ndarray:
    """The one channel of a binary mask file that holds the mask (see :func:`read_binary_mask`)."""
    if img.mode in ("P", "L", "I", "I;16"):
        return np.asarray(img)  # palette masks: their indices, not their colours
    if "A" not in img.getbands():
        return np.asarray(img.convert("L"))  # colour: as gray levels, as TuneVLSeg reads them
    colour = np.asarray(img.convert("L"))  # PIL's conversion drops the alpha channel
    alpha = np.asarray(img.getchannel("A"))
    if alpha.min() == alpha.max():  # opaque (or uniformly transparent): the colour is the mask
        return colour
    if colour.min() == colour.max():  # the mask is drawn in transparency only
        return alpha
    if np.array_equal(colour > 0, alpha > 0):  # both mark the same pixels
        return colour
    raise ValueError(f"{path}: a {img.mode} mask whose colour and alpha channel mark different pixels; "
                     "save the mask as one grayscale (L) channel")


def read_binary_mask(path: str) -> np.ndarray:
    """A binary (TuneVLSeg) mask file as uint8: 1 inside, 0 outside, :data:`VOID_INDEX` void.

    Values ``{0, 1}`` or ``{0, 255}`` (255 the object). A palette (``P``) mask is read by index:
    index 255 is the object when the palette paints it white, VOC's void band (ignored, as in the
    VOC format) when it paints it :data:`VOC_VOID_COLOUR`, and refused otherwise. A mask with an
    alpha channel is read from the alpha when only the alpha varies (see :func:`_mask_channel`).
    Anything else is refused with what was found, naming the file.
    """
    try:
        with Image.open(path) as img:
            img.load()
            values = _mask_channel(img, path)
            palette = img.getpalette() if img.mode == "P" else None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read mask {path}: {err}") from err
    if values.ndim != 2:
        raise ValueError(f"{path}: expected a one-channel mask, got shape {values.shape}")
    found = set(np.unique(values).tolist())
    if palette is not None and VOID_INDEX in found and len(palette) >= 3 * (VOID_INDEX + 1):
        painted = tuple(palette[3 * VOID_INDEX:3 * VOID_INDEX + 3])
        if painted == VOC_VOID_COLOUR:  # VOC's void band: ignored, never the object
            if found <= {0, 1, VOID_INDEX}:
                return values.astype(np.uint8)
            raise ValueError(f"{path}: a palette mask with VOC's void band (255) and values {sorted(found)[:10]}; a "
                             "binary mask holds 0 and 1 besides void (a class mask needs format: voc)")
        if painted != (255, 255, 255):
            raise ValueError(f"{path}: palette index 255 is painted {painted}, neither white (the object of a 0/255 "
                             f"mask) nor VOC's void colour {VOC_VOID_COLOUR}; save the mask as grayscale (L)")
    if found <= {0, 1}:
        return values.astype(np.uint8)
    if found <= {0, 255}:
        return (values == 255).astype(np.uint8)
    shown = f"{sorted(found)[:10]}{' ...' if len(found) > 10 else ''}"
    hint = ""
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        hint = " (JPEG compression makes masks non-binary: store masks as PNG)"
    elif VOID_INDEX in found:
        hint = (" (255 besides other values looks like a VOC-style void band: the tunevlseg format reads binary "
                "masks only; the VOC format (format: voc, JPEGImages/, SegmentationClass/) reads class masks and "
                "ignores their void (255) pixels)")
    raise ValueError(f"{path}: a binary mask must hold values {{0, 1}} or {{0, 255}}; found {shown}{hint}")


# -- dataset ---------------------------------------------------------------------------------------
def _albumentations() -> tuple[Any, Any]:
    """albumentations and cv2, imported on first use: they take seconds to import, which
    classification users of :mod:`vlprompt.data` should not pay."""
    # albumentations asks PyPI for a newer version at import unless told not to; a library must
    # not make network calls (vlprompt runs offline), and the user's own setting wins.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations
    import cv2

    return albumentations, cv2


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
        augment: random resized crop (``crop_scale``) and, with ``hflip``, horizontal flips.
        interpolation: ``bicubic``/``bilinear``/``nearest`` for enlarging the image (shrinking
            averages pixel areas); masks always use nearest neighbour.
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
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, not {interpolation!r}")
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
        resize_args = {"interpolation": interp, "mask_interpolation": cv2.INTER_NEAREST, "area_for_downscale": "image"}
        steps: list[Any]
        if self.random_augmentation:
            steps = [A.RandomResizedCrop(size=(h, w), scale=self.crop_scale, **resize_args)]
            if self.hflip:
                steps.append(A.HorizontalFlip(p=0.5))
        else:
            steps = [A.Resize(height=h, width=w, **resize_args)]
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
        key = json.dumps([self.size, self.mean, self.std, self.interpolation, self.random_augmentation,
                          self.crop_scale, self.hflip, self.train], default=repr)
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
            ids = _read_index_mask(sample.mask)
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


# -- data module -------------------------------------------------------------------------------------
class SegmentationDataModule(SplitLoaders, pl.LightningDataModule):
    """Train/val/test/predict loaders of image-text-mask data (TuneVLSeg's task).

    Reads ``root`` in ``format`` ``tunevlseg`` (:func:`read_tunevlseg`) or ``voc``
    (:func:`read_voc`) at construction, so a bad folder fails at once. The model hands over its
    backbone's preprocessing with :meth:`set_preprocess` (size, mean, std, interpolation), as with
    :class:`~vlprompt.data.FewShotDataModule`. Evaluation loaders split the data over DDP processes
    without padding. Predict serves the test split; without a test split, val is tested (logged:
    VOC's test masks are not public).

    Args:
        root: the dataset folder.
        format: ``tunevlseg`` or ``voc``.
        classnames: VOC class names by id (default :data:`VOC_CLASSNAMES`); exposed as
            :attr:`classnames` (None for TuneVLSeg data, whose prompts are free text).
        prompt_index: TuneVLSeg only: keep the prompts of key ``p<i>`` (all keys when None).
        size, mean, std, interpolation: preprocessing until the model sets its own.
        augment: random resized crop (``crop_scale``) and flip for training; never for val/test.
        hflip: horizontal flips in training; None: on for ``voc``, off for ``tunevlseg`` (TuneVLSeg
            leaves flips out: its prompts may name a side, e.g. "left").
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
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.format = format
        if format == "tunevlseg":
            if classnames is not None:
                raise ValueError("classnames are for format='voc'; TuneVLSeg data has free-text prompts")
            self.samples = read_tunevlseg(self.root, prompt_index=prompt_index)
            self.classnames: list[str] | None = None
        elif format == "voc":
            if prompt_index is not None:
                raise ValueError("prompt_index is for format='tunevlseg'")
            self.samples = read_voc(self.root, classnames=classnames)
            self.classnames = [normalize_classname(c) for c in (classnames or VOC_CLASSNAMES)]
        else:
            raise ValueError(f"unknown format {format!r}; use 'tunevlseg' or 'voc'")
        self.preprocess_cfg: dict[str, Any] = {"size": size, "mean": tuple(mean), "std": tuple(std),
                                               "interpolation": interpolation}
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.augment, self.crop_scale, self.on_error, self.seed = augment, tuple(crop_scale), on_error, seed
        self.hflip = (format == "voc") if hflip is None else hflip
        self.datasets: dict[str, SegmentationDataset] = {}

    # -- preprocessing handed over by the model -------------------------------------------------
    def set_preprocess(self, preprocess_cfg: dict[str, Any]) -> None:
        """Use the backbone's ``size``, ``mean``, ``std`` and ``interpolation`` (keys it lacks keep
        their values; ``resize_mode`` is not followed: segmentation resizes without cropping)."""
        cfg = dict(self.preprocess_cfg)
        cfg.update({k: preprocess_cfg[k] for k in ("size", "mean", "std", "interpolation") if k in preprocess_cfg})
        if cfg["interpolation"] not in _INTERPOLATIONS:
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
                                   hflip=self.hflip, on_error=self.on_error, seed=self.seed, **self._preprocess_args())

