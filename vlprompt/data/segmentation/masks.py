"""Reading mask files: binary (TuneVLSeg) masks and class-index (VOC palette) masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlprompt.data.files import UnreadableImageError
from vlprompt.data.segmentation.samples import VOC_VOID_COLOUR, VOID_INDEX

__all__ = ["read_binary_mask", "read_index_mask"]


def read_index_mask(path: str) -> np.ndarray:
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
