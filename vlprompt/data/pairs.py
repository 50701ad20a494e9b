"""Image-text pairs for meta-training, read where they lie: a folder of images with captions beside
them, a CSV/TSV file of image paths and captions, or WebDataset tar shards (the usual form of
CC3M-like corpora), streamed member by member, never loaded whole.

Every pair has a ``ref`` that reads its image again later (a path, or a shard and the byte range of
the image inside it), so episodes can load exactly the images they draw.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image

from vlprompt.data.files import IMAGE_EXTENSIONS, list_images
from vlprompt.data.images import UnreadableImageError, load_rgb, to_rgb

__all__ = ["DamagedShardError", "ImagePair", "ImageTextPairs", "ImageTextPairsDataModule", "expand_shards",
           "load_pair_image"]

log = logging.getLogger(__name__)

CAPTION_SUFFIXES = (".txt", ".caption")
_PATH_COLUMNS = ("image", "filepath", "path", "file", "img", "image_path")
_TEXT_COLUMNS = ("caption", "text", "title", "captions")


@dataclass(frozen=True)
class ImagePair:
    """One image and its caption. ``ref`` is a file path, or ``(shard, offset, size)`` of the image
    bytes inside an uncompressed tar shard."""

    key: str
    caption: str
    ref: str | tuple[str, int, int]


def expand_shards(pattern: str) -> list[str]:
    """WebDataset's brace notation: ``data/cc-{000..009}.tar`` names ten shards (zero padding kept);
    several patterns may be joined with ``::``."""
    shards: list[str] = []
    for part in pattern.split("::"):
        match = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if match is None:
            shards.append(part)
            continue
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        for i in range(int(first), int(last) + 1):
            shards += expand_shards(part[: match.start()] + str(i).zfill(width) + part[match.end():])
    return shards


def load_pair_image(ref: str | tuple[str, int, int]) -> Image.Image:
    """The image a pair's ``ref`` points at, as RGB (:class:`UnreadableImageError` when it cannot be
    decoded)."""
    if isinstance(ref, str):
        return load_rgb(ref)
    shard, offset, size = ref
    with open(shard, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError) as err:
        raise UnreadableImageError(f"cannot read image at byte {offset} of {shard}: {err}") from err


class ImageTextPairs:
    """The pairs of ``source``:

    - a folder: every image (searched recursively) with a caption file of the same stem
      (``0001.jpg`` + ``0001.txt``);
    - a ``.csv``/``.tsv`` file with a header naming an image column (``image``, ``filepath``,
      ``path`` ...) and a caption column (``caption``, ``text``, ``title``); relative paths are
      relative to the file. Missing image files are an error naming them;
    - ``.tar`` shards (one path, a brace pattern such as ``cc3m-{0000..0099}.tar``, or a folder
      holding them): WebDataset members ``KEY.jpg`` + ``KEY.txt`` are grouped by key.

    Captions are UTF-8 text (a leading BOM is dropped). Like unreadable images, pairs whose caption
    is missing, empty (whitespace only) or not UTF-8 are skipped and counted (:attr:`skipped_by`),
    and each pass logs one summary line naming an example of each; a source where no pair has a
    caption is an error. A damaged shard (truncated, corrupt, or with data after its end-of-archive
    marker) is a :class:`DamagedShardError` naming it: training on part of a shard unawares would
    change the clusters, so it is refused rather than skipped. Shards whose last block is not the
    end-of-archive marker are refused at once; damage further in is found when the pass reaches it.

    Iterating streams the pairs in order; nothing but the captions and references is kept.
    """

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        path = Path(self.source)
        if path.is_dir() and not any(path.glob("*.tar")):
            self.kind = "folder"
        elif path.is_dir():
            self.kind, self.shards = "shards", sorted(str(p) for p in path.glob("*.tar"))
        elif path.suffix.lower() in (".csv", ".tsv"):
            if not path.is_file():
                raise FileNotFoundError(f"captions file {path} does not exist")
            self.kind = "table"
        elif ".tar" in self.source:
            self.kind, self.shards = "shards", expand_shards(self.source)
            missing = [s for s in self.shards if not Path(s).is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} of {len(self.shards)} shards do not exist, e.g. {missing[:3]}")
            compressed = [s for s in self.shards if not s.endswith(".tar")]
            if compressed:
                raise ValueError(f"shards must be uncompressed .tar files (images are read back by byte offset): {compressed[:3]}")
        else:
            raise ValueError(f"{self.source}: expected a folder, a .csv/.tsv file or .tar shards")
        for shard in getattr(self, "shards", []):
            _check_shard_tail(shard)
        #: Pairs skipped in the current (or last) pass, by reason.
        self.skipped_by: Counter[str] = Counter()
        self._examples: dict[str, str] = {}

    @property
    def skipped(self) -> int:
        """Pairs skipped so far in this pass (every reason)."""
        return sum(self.skipped_by.values())

    def __iter__(self) -> Iterator[ImagePair]:
        self.skipped_by, self._examples = Counter(), {}
        if self.kind == "folder":
            pairs = self._folder()
        elif self.kind == "table":
            pairs = self._table()
        else:
            pairs = (pair for shard in self.shards for pair in self._shard(shard))
        kept = 0
        for pair in pairs:
            kept += 1
            yield pair
        self._report(kept)

    def _skip(self, reason: str, where: str) -> None:
        """Count a pair skipped for ``reason``; the first of each reason is the summary's example."""
        self.skipped_by[reason] += 1
        self._examples.setdefault(reason, where)
        log.debug("skipping %s: %s", where, reason)

    def _pair(self, key: str, text: bytes, where: str, ref: str | tuple[str, int, int]) -> ImagePair | None:
        """The pair of caption bytes ``text`` (from ``where``), or None (counted) when the caption is not
        UTF-8 text or is empty."""
        try:
            caption = text.decode("utf-8-sig").strip()
        except UnicodeDecodeError as err:
            self._skip(_NOT_UTF8, f"{where}: {err}")
            return None
        if not caption:
            self._skip(_EMPTY, where)
            return None
        return ImagePair(key, caption, ref)

    def _report(self, kept: int) -> None:
        """One summary line for the pass's skips (not one per pair); no pair kept at all is an error."""
        if not self.skipped:
            return
        summary = "; ".join(f"{n} {reason} (e.g. {self._examples[reason]}{_HINTS.get(reason, '')})"
                            for reason, n in self.skipped_by.items())
        if not kept:
            what = "both an image and a caption" if _NO_IMAGE in self.skipped_by else "a caption"
            raise ValueError(f"{self.source}: no pair has {what}: {summary}")
        if _reports():
            log.warning("%s: skipped %d of %d pairs: %s", self.source, self.skipped, kept + self.skipped, summary)

    def _folder(self) -> Iterator[ImagePair]:
        root = Path(self.source)
        for image in list_images(root):
            text = next((image.with_suffix(s) for s in CAPTION_SUFFIXES if image.with_suffix(s).is_file()), None)
            if text is None:
                self._skip(_NO_CAPTION, str(image))
                continue
            pair = self._pair(str(image.relative_to(root).with_suffix("")), text.read_bytes(), str(text), str(image))
            if pair is not None:
                yield pair

    def _table(self) -> Iterator[ImagePair]:
        path = Path(self.source)
        # Bytes that are not UTF-8 are kept as escapes, so a bad caption is a counted skip like a bad
        # caption file, not an error on the whole table; utf-8-sig drops a spreadsheet's BOM.
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            columns = {c.lower().strip(): c for c in reader.fieldnames or []}
            image_col = next((columns[c] for c in _PATH_COLUMNS if c in columns), None)
            text_col = next((columns[c] for c in _TEXT_COLUMNS if c in columns), None)
            if image_col is None or text_col is None:
                raise ValueError(f"{path}: the header must name an image column ({', '.join(_PATH_COLUMNS)}) and a "
                                 f"caption column ({', '.join(_TEXT_COLUMNS)}); it has {reader.fieldnames}")
            rows = [(row[image_col], row[text_col] or "", reader.line_num) for row in reader]
        files = [p if Path(p).is_absolute() else str(path.parent / p) for p, _, _ in rows]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: {len(missing)} of {len(rows)} images do not exist, e.g. {missing[:3]}")
        for (name, text, line), file in zip(rows, files):
            pair = self._pair(name, text.encode("utf-8", "surrogateescape"), f"{path} line {line}", file)
            if pair is not None:
                yield pair

    def _shard(self, shard: str) -> Iterator[ImagePair]:
        size = Path(shard).stat().st_size
        pending: dict[str, dict[str, Any]] = {}
        pairs, last, end = 0, "", 0
        try:
            with tarfile.open(shard, mode="r|") as tar:  # a stream: members are read once, in order
                for member in tar:
                    if member.offset_data + member.size > size:
                        raise DamagedShardError(
                            f"{shard} is truncated inside member {member.name} (its data ends at byte "
                            f"{member.offset_data + member.size}, the file at {size}; {pairs} pairs read); {_REDO}")
                    last = member.name
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    ext = "." + ext.lower()
                    if ext in IMAGE_EXTENSIONS:
                        entry = pending.setdefault(key, {"where": f"{shard} member {member.name}"})
                        entry["ref"] = (shard, member.offset_data, member.size)
                    elif ext in CAPTION_SUFFIXES:
                        entry = pending.setdefault(key, {})
                        entry["text"], entry["where"] = tar.extractfile(member).read(), f"{shard} member {member.name}"
                    else:  # other files of the sample (.json, .cls ...)
                        continue
                    if "ref" in entry and "text" in entry:  # WebDataset keeps a sample's files together
                        del pending[key]
                        pair = self._pair(key, entry["text"], entry["where"], entry["ref"])
                        if pair is not None:
                            pairs += 1
                            yield pair
                end = tar.offset  # where the end-of-archive marker must be
        except tarfile.TarError as err:  # tarfile names neither the file nor the place
            place = f"after member {last} ({pairs} pairs read)" if last else "at its start"
            raise DamagedShardError(f"{shard} is not a readable tar file {place}: {err}; {_REDO}") from err
        _check_shard_end(shard, end, size, last, pairs)
        for entry in pending.values():
            self._skip(_NO_CAPTION if "ref" in entry else _NO_IMAGE, entry["where"])


class DamagedShardError(OSError):
    """A tar shard that is not whole: truncated, corrupt, or holding data no member accounts for."""


_NO_CAPTION, _NO_IMAGE = "images without a caption", "captions without an image"
_EMPTY, _NOT_UTF8 = "empty captions", "captions that are not UTF-8 text"
_HINTS = {_NOT_UTF8: "; re-save the captions as UTF-8"}
_REDO = "re-download or re-create it"
_BLOCK = tarfile.BLOCKSIZE


def _reports() -> bool:
    """Whether this process logs a pass's summary: every loader worker streams all the pairs (taking
    every n-th), so each sees the same skips and only the first reports them."""
    info = torch.utils.data.get_worker_info()
    return info is None or info.id == 0


def _check_shard_tail(shard: str) -> None:
    """Refuse, before any pass, a shard whose last block is not a tar end-of-archive marker (zeros):
    cut short (an interrupted download) or not a tar file at all."""
    size = Path(shard).stat().st_size
    with open(shard, "rb") as fh:
        fh.seek(max(size - _BLOCK, 0))
        tail = fh.read(_BLOCK)
    if size < _BLOCK or size % _BLOCK or tail.count(0) < _BLOCK:
        raise DamagedShardError(f"{shard} does not end in a tar end-of-archive marker ({size} bytes): truncated "
                                f"(an interrupted download?) or not a tar file; {_REDO}")


def _check_shard_end(shard: str, end: int, size: int, last: str, pairs: int) -> None:
    """Refuse a shard whose members are not followed by the end-of-archive marker and nothing but zero
    padding: tarfile's stream stops quietly at a missing, cut or garbled header (or at the first of
    two concatenated archives), which would drop the rest of the shard unseen."""
    place = f"after member {last} ({pairs} pairs read from it)" if last else "before its first member"
    with open(shard, "rb") as fh:
        fh.seek(end)
        marker = fh.read(_BLOCK)
        if len(marker) < _BLOCK and marker.count(0) == len(marker):
            raise DamagedShardError(f"{shard} is truncated: it ends at byte {size} {place}, with no end-of-archive "
                                    f"marker; {_REDO}")
        if marker.count(0) < _BLOCK:
            raise DamagedShardError(f"{shard} is corrupt: byte {end}, {place}, starts neither a tar header nor the "
                                    f"end-of-archive marker; {_REDO}")
        while chunk := fh.read(1 << 16):
            if chunk.count(0) < len(chunk):
                raise DamagedShardError(f"{shard} has data after its end-of-archive marker (byte {end}) that no member "
                                        f"accounts for (concatenated archives?); {_REDO}")


class _PairImages(torch.utils.data.IterableDataset):
    """One streaming pass over the pairs: ``(position, image tensor or None, caption)``; workers take
    every ``n``-th pair."""

    def __init__(self, pairs: ImageTextPairs, transform: Callable) -> None:
        self.pairs, self.transform = pairs, transform

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor | None, str, object]]:
        info = torch.utils.data.get_worker_info()
        workers, rank = (info.num_workers, info.id) if info is not None else (1, 0)
        for i, pair in enumerate(self.pairs):
            if i % workers != rank:
                continue
            try:
                image = self.transform(load_pair_image(pair.ref))
            except UnreadableImageError as err:
                log.warning("skipping pair %s: %s", pair.key, err)
                image = None
            yield i, image, pair.caption, pair.ref


class _Episodes(torch.utils.data.Dataset):
    """``length`` episodes from ``episodes`` (anything whose item ``i`` has ``support``/``query`` pair
    indices, labels and names), the images loaded when asked; ``epoch`` shifts to new episodes."""

    def __init__(self, episodes: Any, length: int, refs: list, transform: Callable | None) -> None:
        self.episodes, self.length, self.refs, self.transform = episodes, length, refs, transform
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(i, self.epoch)

    def item(self, i: int, epoch: int) -> dict[str, Any]:
        """Episode ``i`` of ``epoch`` (also which, under ``index`` and ``epoch``)."""
        ep = self.episodes[epoch * self.length + i]
        item: dict[str, Any] = {"support": torch.as_tensor(ep.support), "support_labels": torch.as_tensor(ep.support_labels),
                                "support_names": list(ep.support_names), "query": torch.as_tensor(ep.query),
                                "query_labels": torch.as_tensor(ep.query_labels), "query_names": list(ep.query_names),
                                "index": i, "epoch": epoch}
        if self.transform is not None:
            for part in ("support", "query"):
                item[f"{part}_image"] = torch.stack([self.transform(load_pair_image(self.refs[j])) for j in item[part]])
        return item


class ImageTextPairsDataModule(pl.LightningDataModule):
    """Unlabelled image-text pairs (:class:`ImageTextPairs`) for meta-training (GRAM).

    The meta-learner reads every pair once through :meth:`embedding_loader` (streamed, in the
    backbone's preprocessing), turns them into tasks, and hands back an episode source with
    :meth:`set_episodes`; :meth:`train_dataloader` then yields lists of ``episodes_per_batch``
    episodes, each a dict of support/query pair indices, labels and class names, with the images
    when the learner prompts the image tower.

    Args:
        source: a folder, a CSV/TSV file or ``.tar`` shards (see :class:`ImageTextPairs`).
        episodes_per_epoch: episodes in one training epoch (new ones every epoch).
        episodes_per_batch: episodes in one meta-step.
        embed_batch_size: images per batch of the embedding pass.
        num_workers: data-loading processes.
    """

    def __init__(self, source: str, *, episodes_per_epoch: int = 200, episodes_per_batch: int = 4,
                 embed_batch_size: int = 256, num_workers: int = 2) -> None:
        super().__init__()
        self.pairs = ImageTextPairs(source)
        self.episodes_per_epoch, self.episodes_per_batch = episodes_per_epoch, episodes_per_batch
        self.embed_batch_size, self.num_workers = embed_batch_size, num_workers
        self.transform: Callable | None = None
        #: Filled by the embedding pass: each kept pair's caption and image reference.
        self.captions: list[str] = []
        self.refs: list = []
        self.unreadable = 0
        self._episodes: _Episodes | None = None

    def set_preprocess(self, preprocess_cfg: dict[str, Any]) -> None:
        from vlprompt.data.images import build_eval_transform

        self.transform = build_eval_transform(preprocess_cfg)

    def embedding_loader(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Batches ``(images, captions)`` of every readable pair, in one streaming pass; records the
        kept pairs' captions and references, and counts unreadable images (skipped, logged)."""
        if self.transform is None:
            raise RuntimeError("set_preprocess must come before the embedding pass")
        loader = torch.utils.data.DataLoader(_PairImages(self.pairs, self.transform), batch_size=None,
                                             num_workers=self.num_workers)
        self.captions, self.refs, self.unreadable = [], [], 0
        kept: list[tuple[int, torch.Tensor, str, object]] = []
        for item in loader:
            if item[1] is None:
                self.unreadable += 1
                continue
            kept.append(item)
            if len(kept) == self.embed_batch_size:
                yield self._emit(kept)
                kept = []
        if kept:
            yield self._emit(kept)
        if not self.captions:
            raise ValueError(f"{self.pairs.source}: no readable image-text pairs")

    def _emit(self, kept: list) -> tuple[torch.Tensor, list[str]]:
        kept.sort(key=lambda item: item[0])  # workers interleave: keep the source's order within a batch
        self.captions += [c for _, _, c, _ in kept]
        self.refs += [r for _, _, _, r in kept]
        return torch.stack([im for _, im, _, _ in kept]), [c for _, _, c, _ in kept]

    def set_episodes(self, episodes: Any, with_images: bool) -> None:
        """The episode source (item ``i`` -> an episode over pair indices) and whether episodes carry
        their images (learners that prompt the image tower) or only indices (cached features)."""
        self._episodes = _Episodes(episodes, self.episodes_per_epoch, self.refs, self.transform if with_images else None)

    def set_epoch(self, epoch: int) -> None:
        if self._episodes is not None:
            self._episodes.epoch = epoch

    def remake_stale_episodes(self, batch: list[dict[str, Any]], epoch: int) -> int:
        """Replace, in place, the episodes of a training ``batch`` drawn for another epoch than
        ``epoch``; returns how many. Loader workers copy the epoch when they start, and Lightning
        starts the first epoch's workers before restoring the loop when resuming from a checkpoint,
        so a resumed run's first epoch would otherwise repeat epoch 0's episodes."""
        stale = [j for j, ep in enumerate(batch) if ep["epoch"] != epoch]
        for j in stale:
            device = batch[j]["support"].device
            fresh = self._episodes.item(batch[j]["index"], epoch)
            batch[j] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fresh.items()}
        return len(stale)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        if self._episodes is None:
            raise RuntimeError("no episodes yet: the meta-learner builds them from the pairs in its setup")
        return torch.utils.data.DataLoader(self._episodes, batch_size=self.episodes_per_batch, shuffle=False,
                                           num_workers=self.num_workers, collate_fn=list,
                                           persistent_workers=False)
