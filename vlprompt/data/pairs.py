"""Image-text pairs for meta-training, read where they lie: a folder of images with captions beside
them, a CSV/TSV file of image paths and captions, or WebDataset tar shards (the usual form of
CC3M-like corpora), streamed member by member, never loaded whole.

Every pair has a ``ref`` that reads its image again later (a path, or a shard and the byte range of
the image inside it), so episodes can load exactly the images they draw.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image

from vlprompt.data.formats import find_format
from vlprompt.data.formats.pair_records import NO_IMAGE, NOT_UTF8, ImagePair, SkippedPair
from vlprompt.data.formats.webdataset import DamagedShardError, expand_shards
from vlprompt.data.images import UnreadableImageError, load_rgb, to_rgb

__all__ = ["DamagedShardError", "ImagePair", "ImageTextPairs", "ImageTextPairsDataModule", "expand_shards",
           "load_pair_image"]

log = logging.getLogger(__name__)



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
    """The pairs of ``source``, in the first registered pairs format (:mod:`vlprompt.data.formats`)
    that recognises it:

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
        fmt = find_format("pairs", self.source)
        if fmt is None:
            raise ValueError(f"{self.source}: expected a folder, a .csv/.tsv file or .tar shards")
        #: the registered pairs format of the source (``caption_folder``, ``caption_table``, ``webdataset`` ...)
        self.format = fmt.name
        self._records = fmt.read(self.source)  # checks what can be checked before a pass
        #: Pairs skipped in the current (or last) pass, by reason.
        self.skipped_by: Counter[str] = Counter()
        self._examples: dict[str, str] = {}

    @property
    def skipped(self) -> int:
        """Pairs skipped so far in this pass (every reason)."""
        return sum(self.skipped_by.values())

    def __iter__(self) -> Iterator[ImagePair]:
        self.skipped_by, self._examples = Counter(), {}
        kept = 0
        for record in self._records:
            if isinstance(record, SkippedPair):
                self._skip(record.reason, record.where)
                continue
            kept += 1
            yield record
        self._report(kept)

    def _skip(self, reason: str, where: str) -> None:
        """Count a pair skipped for ``reason``; the first of each reason is the summary's example."""
        self.skipped_by[reason] += 1
        self._examples.setdefault(reason, where)
        log.debug("skipping %s: %s", where, reason)

    def _report(self, kept: int) -> None:
        """One summary line for the pass's skips (not one per pair); no pair kept at all is an error."""
        if not self.skipped:
            return
        summary = "; ".join(f"{n} {reason} (e.g. {self._examples[reason]}{_HINTS.get(reason, '')})"
                            for reason, n in self.skipped_by.items())
        if not kept:
            what = "both an image and a caption" if NO_IMAGE in self.skipped_by else "a caption"
            raise ValueError(f"{self.source}: no pair has {what}: {summary}")
        if _reports():
            log.warning("%s: skipped %d of %d pairs: %s", self.source, self.skipped, kept + self.skipped, summary)


_HINTS = {NOT_UTF8: "; re-save the captions as UTF-8"}
def _reports() -> bool:
    """Whether this process logs a pass's summary: every loader worker streams all the pairs (taking
    every n-th), so each sees the same skips and only the first reports them."""
    info = torch.utils.data.get_worker_info()
    return info is None or info.id == 0


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
