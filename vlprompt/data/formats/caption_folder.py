"""A folder of images with a caption file of the same stem beside each (``0001.jpg`` +
``0001.txt``), searched recursively."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from vlprompt.data.files import list_images
from vlprompt.data.formats.pair_records import CAPTION_SUFFIXES, NO_CAPTION, ImagePair, SkippedPair, caption_pair
from vlprompt.data.formats.registry import register_format

__all__ = ["CaptionFolder"]


def _is_caption_folder(source: str) -> bool:
    path = Path(source)
    return path.is_dir() and not any(path.glob("*.tar"))


@register_format("caption_folder", task="pairs", detect=_is_caption_folder)
class CaptionFolder:
    """The pairs of a caption folder, in path order."""

    def __init__(self, source: str) -> None:
        self.root = Path(source)

    def __iter__(self) -> Iterator[ImagePair | SkippedPair]:
        for image in list_images(self.root):
            text = next((image.with_suffix(s) for s in CAPTION_SUFFIXES if image.with_suffix(s).is_file()), None)
            if text is None:
                yield SkippedPair(NO_CAPTION, str(image))
            else:
                yield caption_pair(str(image.relative_to(self.root).with_suffix("")), text.read_bytes(), str(text), str(image))
