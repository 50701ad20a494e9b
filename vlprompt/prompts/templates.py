"""Hand-written prompt templates: one per dataset (as in CoOp) or ensembles (as in CLIP)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TEMPLATE_SETS", "resolve_templates"]


def _open_clip_templates(attr: str) -> list[str]:
    # open_clip ships CLIP's ImageNet templates as callables; evaluating them on "{}" turns
    # them back into format strings.
    from open_clip import zero_shot_metadata

    return [t("{}") for t in getattr(zero_shot_metadata, attr)]


def _named_sets() -> dict[str, list[str]]:
    return {
        "photo": ["a photo of a {}."],
        "imagenet7": _open_clip_templates("SIMPLE_IMAGENET_TEMPLATES"),
        "imagenet80": _open_clip_templates("OPENAI_IMAGENET_TEMPLATES"),
    }


TEMPLATE_SETS: tuple[str, ...] = ("photo", "imagenet7", "imagenet80")


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """Turn a set name (``photo``, ``imagenet7``, ``imagenet80``), a single template or a list of
    templates into a validated list of format strings with exactly one ``{}``."""
    if isinstance(templates, str):
        named = _named_sets()
        templates = named[templates] if templates in named else [templates]
    out = list(templates)
    if not out:
        raise ValueError("at least one template is needed")
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}' for the class name")
    return out
