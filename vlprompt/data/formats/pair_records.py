"""What image-text pair formats yield: :class:`ImagePair` records, or :class:`SkippedPair` for a
pair that cannot be used (no caption, no image, a caption that is empty or not UTF-8), so that
:class:`~vlprompt.data.pairs.ImageTextPairs` counts every skip the same way whatever the format."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CAPTION_SUFFIXES", "EMPTY", "NOT_UTF8", "NO_CAPTION", "NO_IMAGE", "ImagePair", "SkippedPair", "caption_pair"]

#: Extensions of caption files beside their image (``0001.jpg`` + ``0001.txt``) or tar members.
CAPTION_SUFFIXES = (".txt", ".caption")

# Reasons a pair is skipped, as the pass's summary line names them.
NO_CAPTION, NO_IMAGE = "images without a caption", "captions without an image"
EMPTY, NOT_UTF8 = "empty captions", "captions that are not UTF-8 text"


@dataclass(frozen=True)
class ImagePair:
    """One image and its caption. ``ref`` is a file path, or ``(shard, offset, size)`` of the image
    bytes inside an uncompressed tar shard."""

    key: str
    caption: str
    ref: str | tuple[str, int, int]


@dataclass(frozen=True)
class SkippedPair:
    """A pair left out for ``reason``; ``where`` names it (the first of each reason is the example
    of the pass's summary)."""

    reason: str
    where: str


def caption_pair(key: str, text: bytes, where: str, ref: str | tuple[str, int, int]) -> ImagePair | SkippedPair:
    """The pair of caption bytes ``text`` (from ``where``): UTF-8 text (a leading BOM dropped) that
    is not empty once stripped, else a skip."""
    try:
        caption = text.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        return SkippedPair(NOT_UTF8, f"{where}: {err}")
    if not caption:
        return SkippedPair(EMPTY, where)
    return ImagePair(key, caption, ref)
