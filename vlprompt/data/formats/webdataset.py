"""WebDataset tar shards (the usual form of CC3M-like corpora): members ``KEY.jpg`` + ``KEY.txt``
grouped by key, streamed member by member, never loaded whole. An image's ``ref`` is the shard and
the byte range of its member, so it can be read again later."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlprompt.data.files import IMAGE_EXTENSIONS
from vlprompt.data.formats.pair_records import (
    CAPTION_SUFFIXES,
    NO_CAPTION,
    NO_IMAGE,
    ImagePair,
    SkippedPair,
    caption_pair,
)
from vlprompt.data.formats.registry import register_format

__all__ = ["DamagedShardError", "WebDatasetShards", "expand_shards"]

_REDO = "re-download or re-create it"
_BLOCK = tarfile.BLOCKSIZE


class DamagedShardError(OSError):
    """A tar shard that is not whole: truncated, corrupt, or holding data no member accounts for."""


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


def _shard_list(source: str) -> list[str]:
    """The shards of ``source``: the ``.tar`` files of a folder, or a path or brace pattern, whose
    shards must exist and be uncompressed."""
    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    shards = expand_shards(source)
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. {missing[:3]}")
    compressed = [s for s in shards if not s.endswith(".tar")]
    if compressed:
        raise ValueError(f"shards must be uncompressed .tar files (images are read back by byte offset): {compressed[:3]}")
    return shards


def _is_shards(source: str) -> bool:
    path = Path(source)
    return path.is_dir() or (path.suffix.lower() not in (".csv", ".tsv") and ".tar" in source)


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str, pending: dict[str, dict[str, Any]]
                ) -> tuple[str, dict[str, Any]] | None:
    """File ``member`` under its key in ``pending`` (an image's byte range, or a caption's bytes);
    None for a member that is neither."""
    key, _, ext = member.name.partition(".")
    ext = "." + ext.lower()
    if ext in IMAGE_EXTENSIONS:
        entry = pending.setdefault(key, {"where": f"{shard} member {member.name}"})
        entry["ref"] = (shard, member.offset_data, member.size)
    elif ext in CAPTION_SUFFIXES:
        entry = pending.setdefault(key, {})
        entry["text"], entry["where"] = tar.extractfile(member).read(), f"{shard} member {member.name}"
    else:  # other files of the sample (.json, .cls ...)
        return None
    return key, entry


@register_format("webdataset", task="pairs", detect=_is_shards)
class WebDatasetShards:
    """The pairs of tar shards (one path, a brace pattern such as ``cc3m-{0000..0099}.tar``, or a
    folder holding them). Shards whose last block is not the end-of-archive marker are refused at
    once (:class:`DamagedShardError`); damage further in is found when the pass reaches it."""

    def __init__(self, source: str) -> None:
        self.shards = _shard_list(source)
        for shard in self.shards:
            _check_shard_tail(shard)

    def __iter__(self) -> Iterator[ImagePair | SkippedPair]:
        for shard in self.shards:
            yield from self._shard(shard)

    @staticmethod
    def _shard(shard: str) -> Iterator[ImagePair | SkippedPair]:
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
                    filed = _add_member(tar, member, shard, pending) if member.isfile() else None
                    if filed is None or not {"ref", "text"} <= filed[1].keys():
                        continue
                    key, entry = filed  # WebDataset keeps a sample's files together
                    del pending[key]
                    record = caption_pair(key, entry["text"], entry["where"], entry["ref"])
                    pairs += isinstance(record, ImagePair)
                    yield record
                end = tar.offset  # where the end-of-archive marker must be
        except tarfile.TarError as err:  # tarfile names neither the file nor the place
            place = f"after member {last} ({pairs} pairs read)" if last else "at its start"
            raise DamagedShardError(f"{shard} is not a readable tar file {place}: {err}; {_REDO}") from err
        _check_shard_end(shard, end, size, last, pairs)
        for entry in pending.values():
            yield SkippedPair(NO_CAPTION if "ref" in entry else NO_IMAGE, entry["where"])
