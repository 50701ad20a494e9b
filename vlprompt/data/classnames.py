"""Class names as the reference implementations write them, checked and read in one place.

Light on purpose (standard library only): prompt learners import it too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["check_distinct_classnames", "normalize_classname", "fill_template", "read_classnames_file", "with_full_stop"]


def normalize_classname(name: str) -> str:
    """``"golden_retriever "`` -> ``"golden retriever"``: underscores become spaces and runs of
    whitespace one space, as every reference implementation (CoOp, CoCoOp, MaPLe, KgCoOp,
    PromptSRC, TPT) does before tokenising."""
    return re.sub(r"\s+", " ", str(name).replace("_", " ")).strip()


def with_full_stop(text: str) -> str:
    """``text`` ending in one full stop: ``"."`` is added only where the text does not already end
    in one (TuneVLSeg's ``insert_stop_at_last``), so a prompt written as a sentence, such as a
    referring expression ``"the red circle."``, does not become ``"the red circle.."``. Every
    prompt vlprompt builds from free text ends this way: CoOp-style prompts with the name last, and
    hand-written templates (``"{}"`` too, which adds no stop of its own)."""
    return text if text.endswith(".") else text + "."


def fill_template(template: str, name: str) -> str:
    """A hand-written template filled with ``name``, ending in one full stop: a template that ends
    in ``"{}."`` adds no second stop to a name that ends in one (``"a photo of a {}."`` with
    ``"the red circle."``), and ``"{}"`` adds the stop a name lacks (:func:`with_full_stop`)."""
    if name.endswith(".") and template.endswith("{}."):
        template = template[:-1]
    return with_full_stop(template.format(name))


def check_distinct_classnames(names: Sequence[str], where: str) -> None:
    """Raise when two classes share a name (after normalisation, ignoring case): the classifier
    could not tell them apart."""
    seen: dict[str, str] = {}
    duplicates = []
    for name in names:
        key = normalize_classname(name).lower()
        if key in seen:
            duplicates.append(f"{seen[key]!r} and {name!r}")
        seen.setdefault(key, name)
    if duplicates:
        raise ValueError(f"{where}: duplicate class names: {'; '.join(duplicates[:10])}")
    if any(not normalize_classname(n) for n in names):
        raise ValueError(f"{where}: empty class name in {list(names)[:20]}")


def read_classnames_file(path: str | Path, folders: Iterable[str] = ()) -> list[tuple[str | None, str]]:
    """Read a class-names file: one class per line, in label order; blank lines and ``#`` comments
    are skipped. A line ``<folder> <name>`` (ImageNet's ``classnames.txt``) maps a folder of the
    data to its class name: the first word is read as a folder only when it is one of ``folders``
    (the class folders present); otherwise the whole line is the name. Returns ``(folder or None,
    normalised name)`` per class."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    known = set(folders)
    out: list[tuple[str | None, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first, _, rest = line.partition(" ")
        if first in known and rest.strip():
            out.append((first, normalize_classname(rest)))
        else:
            out.append((None, normalize_classname(line)))
    if not out:
        raise ValueError(f"{path} lists no class names (one per line expected)")
    check_distinct_classnames([name for _, name in out], str(path))
    return out
