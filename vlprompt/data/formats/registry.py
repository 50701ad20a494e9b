"""The data-format registry: every on-disk layout vlprompt reads, by task, under one name.

A format is a reader function registered with :func:`register_format`::

    @register_format("imagefolder", task="classification", detect=lambda source: True)
    def read_imagefolder_source(source: ClassificationSource) -> SplitSamples: ...

Readers of one task take the same source object (:class:`ClassificationSource`,
:class:`SegmentationSource`) so data modules dispatch with :func:`get_format` instead of an
if-chain over names. ``aliases`` keeps old names working (``dassl_split`` is ``dassl``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ClassificationSource",
    "DataFormat",
    "SegmentationSource",
    "Task",
    "detect_format",
    "find_format",
    "format_names",
    "get_format",
    "register_format",
    "unregister_format",
]

log = logging.getLogger(__name__)

#: What a format's data is for.
Task = Literal["classification", "segmentation", "pairs"]
TASKS: tuple[str, ...] = ("classification", "segmentation", "pairs")


@dataclass(frozen=True)
class ClassificationSource:
    """Where a classification dataset lies and how to read it (every reader picks what it needs)."""

    root: Path
    split_file: str | None = None
    image_dir: str | None = None
    train_csv: str | None = None
    val_csv: str | None = None
    test_csv: str | None = None
    classnames: Sequence[str] | None = None
    classnames_file: str | None = None
    seed: int = 1


@dataclass(frozen=True)
class SegmentationSource:
    """Where a segmentation dataset lies and the options of its readers."""

    root: Path
    classnames: Sequence[str] | None = None
    prompt_index: int | None = None


@dataclass(frozen=True)
class DataFormat:
    """A registered format.

    Attributes:
        name: the format's name, as configs write it.
        task: ``classification``, ``segmentation`` or ``pairs``.
        read: the reader; its argument is the task's source object.
        aliases: older names that still select this format.
        detect: ``detect(source) -> bool``, whether the source looks like this format (``auto``);
            formats are tried in registration order.
        read_descriptor: ``read_descriptor(descriptor, root) -> SplitSamples`` for a standard
            benchmark described in ``datasets/`` (classification formats only).
        descriptor_keys: descriptor keys only this format may use.
        check_descriptor: ``check_descriptor(fields, name, path)`` raises ``ValueError`` when a
            descriptor lacks what this format needs (``fields``: the descriptor's keys).
    """

    name: str
    task: str
    read: Callable[..., Any] | None = None
    aliases: tuple[str, ...] = ()
    detect: Callable[[Any], bool] | None = None
    read_descriptor: Callable[..., Any] | None = None
    descriptor_keys: tuple[str, ...] = ()
    check_descriptor: Callable[..., None] | None = field(default=None, compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        """The name and its aliases."""
        return (self.name, *self.aliases)


_FORMATS: dict[str, DataFormat] = {}  # name -> format, in registration order
_ALIASES: dict[str, str] = {}  # alias -> name


def register_format(name: str, *, task: Task, aliases: Sequence[str] = (), **attributes: Any) -> Callable:
    """Decorator registering a reader as the format ``name`` of ``task`` (see :class:`DataFormat`
    for ``attributes``); returns the reader unchanged."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")

    def decorate(read: Callable[..., Any]) -> Callable[..., Any]:
        add_format(DataFormat(name, task, read, tuple(aliases), **attributes))
        return read

    return decorate


def add_format(fmt: DataFormat) -> DataFormat:
    """Register ``fmt`` (a format whose reader is not a single function, e.g. descriptor-only)."""
    taken = [n for n in fmt.names if n in _FORMATS or n in _ALIASES]
    if taken:
        raise ValueError(f"data format name {taken[0]!r} is already registered")
    _FORMATS[fmt.name] = fmt
    _ALIASES.update({alias: fmt.name for alias in fmt.aliases})
    log.debug("registered data format %s (%s)", fmt.name, fmt.task)
    return fmt


def unregister_format(name: str) -> DataFormat:
    """Remove the format ``name`` (and its aliases) from the registry; returns it."""
    fmt = _FORMATS.pop(name)
    for alias in fmt.aliases:
        _ALIASES.pop(alias, None)
    return fmt


def format_names(task: Task | None = None, *, aliases: bool = False, descriptor: bool = False) -> list[str]:
    """Registered names of ``task`` (all tasks when None), in registration order; with
    ``aliases`` the old names too; with ``descriptor`` only the formats a dataset descriptor
    can use."""
    formats = [f for f in _FORMATS.values() if task in (None, f.task)]
    if descriptor:
        formats = [f for f in formats if f.read_descriptor is not None]
    return [n for f in formats for n in (f.names if aliases else (f.name,))]


def _or_list(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def get_format(name: str, task: Task | None = None, *, extra: Sequence[str] = ()) -> DataFormat:
    """The format called ``name`` (or one of its aliases), of ``task`` when given. An unknown
    name is a ``ValueError`` listing the known ones (``extra`` names that the caller accepts
    too, such as ``auto``, go first in that list)."""
    fmt = _FORMATS.get(_ALIASES.get(name, name))
    if fmt is None or task not in (None, fmt.task):
        known = [*extra, *format_names(task)]
        raise ValueError(f"unknown format {name!r}; use {_or_list(known)}")
    return fmt


def find_format(task: Task, source: Any) -> DataFormat | None:
    """The first format of ``task`` (in registration order) whose ``detect`` accepts ``source``,
    or None."""
    for fmt in _FORMATS.values():
        if fmt.task == task and fmt.detect is not None and fmt.detect(source):
            return fmt
    return None


def detect_format(task: Task, source: Any) -> DataFormat:
    """As :func:`find_format`, but a source no format recognises is a ``ValueError``."""
    fmt = find_format(task, source)
    if fmt is None:
        raise ValueError(f"{getattr(source, 'root', source)}: no {task} format recognises this data; "
                         f"name one of {', '.join(format_names(task))}")
    return fmt
