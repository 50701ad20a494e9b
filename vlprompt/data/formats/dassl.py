"""CoOp/Dassl split files: ``split_zhou_<Dataset>.json`` lists ``[relative path, label,
classname]`` per split, so prepared benchmark folders are reused as they are."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlprompt.data.classnames import check_distinct_classnames, normalize_classname
from vlprompt.data.formats.registry import ClassificationSource, register_format
from vlprompt.data.samples import Sample, SplitSamples

__all__ = ["read_dassl_split"]


def _classnames_from_samples(samples: Sequence[Sample], where: str) -> list[str]:
    names: dict[int, str] = {}
    for s in samples:
        if names.setdefault(s.label, s.classname) != s.classname:
            raise ValueError(f"{where}: label {s.label} is named both {names[s.label]!r} and {s.classname!r}")
    if not names:
        raise ValueError(f"{where}: no samples")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise ValueError(f"{where}: labels must be 0..{max(names)}, but {missing[:10]} have no samples")
    return [names[i] for i in range(len(names))]


def read_dassl_split(split_file: str | Path, image_dir: str | Path) -> SplitSamples:
    """Read a CoOp/Dassl ``split_zhou_*.json`` file; paths are relative to ``image_dir``."""
    split_file, image_dir = Path(split_file), Path(image_dir)
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    raw = json.loads(split_file.read_text())
    out = SplitSamples()
    for split in ("train", "val", "test"):
        rows = raw.get(split, [])
        try:
            samples = [Sample(str(image_dir / path), int(label), normalize_classname(name)) for path, label, name in rows]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{split_file}: '{split}' rows must be [path, label, classname] ({err})") from err
        setattr(out, split, samples)
    out.classnames = _classnames_from_samples(out.train + out.val + out.test, str(split_file))
    check_distinct_classnames(out.classnames, str(split_file))
    return out


def _looks_like_dassl(source: ClassificationSource) -> bool:
    return bool(source.split_file or list(source.root.glob("split_*.json")))


def _check_descriptor(fields: dict[str, Any], name: str) -> tuple[str, str] | None:
    if fields["split_file"] is None:
        return "split_file", f"required for format {name!r}"
    return None


def _read_descriptor(desc: Any, root: str | Path) -> SplitSamples:
    paths = desc.paths(root)
    return read_dassl_split(paths["split_file"], paths["image_dir"])


@register_format("dassl", task="classification", aliases=("dassl_split",), detect=_looks_like_dassl,
                 read_descriptor=_read_descriptor, check_descriptor=_check_descriptor)
def read_dassl_source(source: ClassificationSource) -> SplitSamples:
    """``root/split_*.json`` (or ``split_file``) over ``root/images`` (or ``image_dir``)."""
    split_file = source.split_file
    if split_file is None:
        found = sorted(source.root.glob("split_*.json"))
        if len(found) != 1:
            raise FileNotFoundError(f"{source.root}: expected one split_*.json file, found {[f.name for f in found]}; pass split_file")
        split_file = str(found[0])
    return read_dassl_split(split_file, source.image_dir or source.root / "images")
