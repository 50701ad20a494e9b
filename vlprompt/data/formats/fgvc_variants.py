"""FGVC-Aircraft's own lists: ``images_variant_{train,val,test}.txt`` (``<image id> <variant>``
lines) and ``variants.txt`` (one class name per line). Read from a dataset descriptor only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlprompt.data.classnames import normalize_classname
from vlprompt.data.formats.registry import DataFormat, add_format
from vlprompt.data.samples import Sample, SplitSamples

__all__ = ["read_fgvc_variants"]

VARIANT_SPLITS: tuple[str, ...] = ("train", "val", "test")


def _read_variant_list(path: Path, image_dir: Path, index: dict[str, int]) -> list[Sample]:
    samples = []
    for line in path.read_text().splitlines():
        image_id, _, variant = line.strip().partition(" ")
        if not image_id:
            continue
        if variant not in index:
            raise ValueError(f"{path}: unknown variant {variant!r}")
        samples.append(Sample(str(image_dir / f"{image_id}.jpg"), index[variant], normalize_classname(variant)))
    return samples


def read_fgvc_variants(desc: Any, root: str | Path) -> SplitSamples:
    """Read a prepared FGVC-Aircraft folder as its descriptor ``desc`` lays it out."""
    paths = desc.paths(root)
    names = [n.strip() for n in paths["classnames_file"].read_text().splitlines() if n.strip()]
    index = {n: i for i, n in enumerate(names)}
    out = SplitSamples(classnames=[normalize_classname(n) for n in names])
    for split in VARIANT_SPLITS:
        setattr(out, split, _read_variant_list(paths[f"variant_{split}"], paths["image_dir"], index))
    return out


def _check_descriptor(fields: dict[str, Any], name: str) -> tuple[str, str] | None:
    variant_files = fields["variant_files"]
    if variant_files is None:
        return "variant_files", f"required for format {name!r}"
    absent = [k for k in VARIANT_SPLITS if k not in variant_files]
    if absent:
        return "variant_files", f"missing entries: {', '.join(absent)}"
    if fields["classnames_file"] is None:
        return "classnames_file", f"required for format {name!r} (variants.txt)"
    return None


add_format(DataFormat("fgvc_variants", "classification", read_descriptor=read_fgvc_variants,
                      check_descriptor=_check_descriptor, descriptor_keys=("variant_files",)))
