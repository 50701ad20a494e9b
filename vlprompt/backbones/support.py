"""Which open_clip models vlprompt can prompt, and how: the support table.

Every model that ``open_clip.list_models()`` names is built on the meta device (no weights are
allocated; hub tokenizers and text towers are replaced by the offline stand-ins of
:mod:`vlprompt.backbones.offline`) and wrapped in :class:`OpenCLIPBackbone`. What the wrapped
backbone reports — text tower kind, pooling, causality, the image tower's prompt adapter — says
which prompt learners run on it. ``tools/zoo_support.py`` prints the table; the zoo contract test
checks that every name wraps or refuses clearly and runs a numeric check on the smallest model of
each family.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vlprompt.backbones.offline import offline_open_clip_model, tokenizer_layout
from vlprompt.backbones.open_clip import OpenCLIPBackbone, hf_text_encoder

__all__ = ["ModelSupport", "family_table", "format_family_table", "model_support"]


@dataclass(frozen=True)
class ModelSupport:
    """What vlprompt does with one open_clip model (see :func:`model_support`)."""

    name: str
    params: int
    text_tower: str  # e.g. "causal TextTransformer, eos pooling"
    tokenizer: str  # special-token layout: clip, t5, gemma, bert, roberta, nllb
    image_tower: str  # e.g. "timm Eva"
    text_prompts: bool
    visual_prompts: bool
    truncation: bool
    refusal: str = ""  # the clear error for visual prompts, when refused

    @property
    def family(self) -> tuple[str, str, str]:
        return self.text_tower, self.tokenizer, self.image_tower


def _image_tower_kind(visual: nn.Module) -> str:
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        return f"timm {type(trunk).__name__}"
    return f"open_clip {type(visual).__name__}"


def _text_tower_kind(backbone: OpenCLIPBackbone) -> str:
    import open_clip

    coca = "CoCa " if isinstance(backbone.model, open_clip.CoCa) else ""
    hf = hf_text_encoder(backbone.model)
    if hf is not None:
        return f"{coca}transformers {hf.config.model_type}, {backbone.pool_type} pooling"
    order = "causal" if backbone.is_causal else "bidirectional"
    return f"{order} {coca}TextTransformer, {backbone.pool_type} pooling"


def model_support(name: str, folder: str | Path) -> ModelSupport:
    """Build ``name`` on the meta device (stand-ins under ``folder``), wrap it and report."""
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = offline_open_clip_model(name, folder, device="meta")
    backbone = OpenCLIPBackbone.from_model(model, tokenizer, name=name)
    hub_tokenizer = open_clip.get_model_config(name).get("text_cfg", {}).get("hf_tokenizer_name")
    refusal = ""
    try:
        backbone.check_visual_prompts()
    except NotImplementedError as err:
        refusal = str(err)
    return ModelSupport(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        text_tower=_text_tower_kind(backbone),
        tokenizer=tokenizer_layout(hub_tokenizer) if hub_tokenizer else "clip",
        image_tower=_image_tower_kind(model.visual),
        text_prompts=backbone.has_text,
        visual_prompts=not refusal,
        truncation=backbone.can_truncate_text,
        refusal=refusal,
    )


def family_table(names: Iterable[str], folder: str | Path) -> dict[tuple[str, str, str], list[ModelSupport]]:
    """:func:`model_support` for each name, grouped by family (text tower, tokenizer, image tower),
    each group sorted by size."""
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # open_clip logs "no pretrained weights" per model
    try:
        rows = [model_support(name, folder) for name in names]
    finally:
        root.setLevel(level)
    families: dict[tuple[str, str, str], list[ModelSupport]] = {}
    for row in rows:
        families.setdefault(row.family, []).append(row)
    return {key: sorted(group, key=lambda r: r.params) for key, group in sorted(families.items())}


def format_family_table(families: dict[tuple[str, str, str], list[ModelSupport]], max_names: int = 4) -> str:
    """A Markdown table with one row per family."""
    lines = [
        "| image tower | text tower | tokenizer | models | text prompts | visual prompts | exact truncation |",
        "|---|---|---|---|---|---|---|",
    ]
    for (text, tok, image), group in families.items():
        names = ", ".join(r.name for r in group[:max_names]) + (f" (+{len(group) - max_names})" if len(group) > max_names else "")
        first = group[0]
        lines.append(
            f"| {image} | {text} | {tok} | {names} | {'yes' if first.text_prompts else 'no'} | "
            f"{'yes' if first.visual_prompts else 'no (clear error)'} | {'yes' if first.truncation else 'no'} |"
        )
    return "\n".join(lines)
