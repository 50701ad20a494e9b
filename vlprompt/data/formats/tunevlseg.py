"""TuneVLSeg's layout (Adhikari et al., ACCV 2024; github naamiinepal/tunevlseg): ``root/images/``,
``root/masks/`` and ``root/anns/{train,val,test}.json``, each a list of ``{"img_name",
"mask_name", "prompts": {"p0": ..., "p1": ...}}`` with binary masks."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlprompt.data.formats.registry import SegmentationSource, register_format
from vlprompt.data.segmentation.samples import (
    SEGMENTATION_SPLITS,
    SegmentationData,
    SegmentationSample,
    check_files_exist,
    check_mask_sizes,
)

__all__ = ["read_tunevlseg"]

log = logging.getLogger(__name__)


def _prompt_keys(prompts: Mapping[str, Any]) -> list[str]:
    """``p0, p1, ..., p10`` by number (TuneVLSeg sorts them so), other keys after, as written."""
    numbered = sorted((int(m.group(1)), k) for k in prompts if (m := re.fullmatch(r"p(\d+)", str(k))))
    return [k for _, k in numbered] + [k for k in prompts if not re.fullmatch(r"p\d+", str(k))]


def _entry_prompts(raw: Any, where: str, prompt_index: int | None) -> tuple[str, ...]:
    """The prompts of one annotation entry, in key order, flattened; ``where`` names the entry."""
    if isinstance(raw, str) or (isinstance(raw, Sequence) and not isinstance(raw, Mapping)):
        if prompt_index is not None:
            raise ValueError(f"{where}: prompt_index={prompt_index} needs prompts keyed p0, p1, ...; found a list")
        groups = [("prompts", raw)]
    elif isinstance(raw, Mapping):
        if prompt_index is not None:
            key = f"p{prompt_index}"
            if key not in raw:
                raise ValueError(f"{where}: no prompt {key!r} (has {', '.join(map(str, raw))})")
            groups = [(key, raw[key])]
        else:
            groups = [(k, raw[k]) for k in _prompt_keys(raw)]
    else:
        raise ValueError(f"{where}: 'prompts' must be a mapping p0, p1, ... or a list, not {type(raw).__name__}")
    out: list[str] = []
    for key, value in groups:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{where}: prompt {key!r} must be a string or a list of strings, not {value!r}")
        for text in texts:
            if text.strip():
                out.append(text.strip())
            # TuneVLSeg's datasets keep p0 as the empty prompt (its random draw skips p0); a
            # text prompt cannot be empty, so that one is dropped. Any other empty one is a mistake.
            elif not (key == "p0" and isinstance(value, str) and prompt_index is None):
                raise ValueError(f"{where}: prompt {key!r} is empty ({value!r})")
    if not out:
        raise ValueError(f"{where}: no non-empty prompt")
    return tuple(out)

def read_tunevlseg(root: str | Path, *, prompt_index: int | None = None) -> dict[str, list[SegmentationSample]]:
    """Read TuneVLSeg's layout: ``root/anns/{train,val,test}.json`` over ``root/images`` and
    ``root/masks``. Each entry's ``prompts`` maps ``p<i>`` to a string or a list of strings (as in
    TuneVLSeg; a plain list is accepted too); they are kept in key order, so ``p1`` comes first when
    ``p0`` is TuneVLSeg's empty prompt. ``prompt_index`` keeps only the prompts of ``p<i>``.

    ``train.json`` is required; a missing ``val.json``/``test.json`` gives an empty split. Empty
    prompts (other than an empty ``p0``), missing image or mask files and masks whose size differs
    from their image's (read from the file headers) are errors.
    """
    root = Path(root).expanduser()
    anns, images, masks = root / "anns", root / "images", root / "masks"
    if not (anns / "train.json").is_file():
        hint = "; it looks like VOC's layout: format voc" if (root / "JPEGImages").is_dir() else ""
        raise FileNotFoundError(
            f"{root} is not in TuneVLSeg's layout: {anns / 'train.json'} not found "
            f"(expected images/, masks/ and anns/{{train,val,test}}.json){hint}")
    splits: dict[str, list[SegmentationSample]] = {}
    for split in SEGMENTATION_SPLITS:
        path = anns / f"{split}.json"
        if not path.is_file():
            log.info("%s: no %s split (%s not found)", root, split, path.name)
            splits[split] = []
            continue
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of entries, found {type(entries).__name__}")
        samples = []
        for i, entry in enumerate(entries):
            where = f"{path}: entry {i}"
            if not isinstance(entry, Mapping) or not all(k in entry for k in ("img_name", "mask_name", "prompts")):
                raise ValueError(f"{where}: expected keys img_name, mask_name and prompts, found {entry!r:.200}")
            where += f" ({entry['img_name']})"
            prompts = _entry_prompts(entry["prompts"], where, prompt_index)
            samples.append(SegmentationSample(str(images / entry["img_name"]), str(masks / entry["mask_name"]), prompts))
        check_files_exist([p for s in samples for p in (s.image, s.mask)], str(path))
        check_mask_sizes([(s.image, s.mask) for s in samples], str(path))
        splits[split] = samples
    if not splits["train"]:
        raise ValueError(f"{anns / 'train.json'} lists no samples")
    return splits


@register_format("tunevlseg", task="segmentation")
def read_tunevlseg_source(source: SegmentationSource) -> SegmentationData:
    """TuneVLSeg data at ``root``: free-text prompts, so no class names."""
    if source.classnames is not None:
        raise ValueError("classnames are for format='voc'; TuneVLSeg data has free-text prompts")
    return SegmentationData(read_tunevlseg(source.root, prompt_index=source.prompt_index), None, free_text_prompts=True)
