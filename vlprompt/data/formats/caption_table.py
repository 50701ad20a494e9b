"""A ``.csv``/``.tsv`` file with a header naming an image column and a caption column; relative
image paths are relative to the file."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from vlprompt.data.formats.pair_records import ImagePair, SkippedPair, caption_pair
from vlprompt.data.formats.registry import register_format

__all__ = ["CaptionTable"]

_PATH_COLUMNS = ("image", "filepath", "path", "file", "img", "image_path")
_TEXT_COLUMNS = ("caption", "text", "title", "captions")


def _is_table(source: str) -> bool:
    return Path(source).suffix.lower() in (".csv", ".tsv")


@register_format("caption_table", task="pairs", detect=_is_table)
class CaptionTable:
    """The pairs of a captions table, in row order. Missing image files are an error naming them."""

    def __init__(self, source: str) -> None:
        self.path = Path(source)
        if not self.path.is_file():
            raise FileNotFoundError(f"captions file {self.path} does not exist")

    def _rows(self) -> list[tuple[str, str, int]]:
        """``(image, caption, line)`` per row."""
        # Bytes that are not UTF-8 are kept as escapes, so a bad caption is a counted skip like a bad
        # caption file, not an error on the whole table; utf-8-sig drops a spreadsheet's BOM.
        with self.path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if self.path.suffix.lower() == ".tsv" else ",")
            columns = {c.lower().strip(): c for c in reader.fieldnames or []}
            image_col = next((columns[c] for c in _PATH_COLUMNS if c in columns), None)
            text_col = next((columns[c] for c in _TEXT_COLUMNS if c in columns), None)
            if image_col is None or text_col is None:
                raise ValueError(f"{self.path}: the header must name an image column ({', '.join(_PATH_COLUMNS)}) and a "
                                 f"caption column ({', '.join(_TEXT_COLUMNS)}); it has {reader.fieldnames}")
            return [(row[image_col], row[text_col] or "", reader.line_num) for row in reader]

    def __iter__(self) -> Iterator[ImagePair | SkippedPair]:
        rows = self._rows()
        files = [p if Path(p).is_absolute() else str(self.path.parent / p) for p, _, _ in rows]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.path}: {len(missing)} of {len(rows)} images do not exist, e.g. {missing[:3]}")
        for (name, text, line), file in zip(rows, files):
            yield caption_pair(name, text.encode("utf-8", "surrogateescape"), f"{self.path} line {line}", file)
