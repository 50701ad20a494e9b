"""Hand-written prompt templates: one per dataset (as in CoOp) or ensembles (as in CLIP)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from vlprompt.backbones import Backbone
from vlprompt.data.classnames import fill_template

__all__ = ["TEMPLATE_SETS", "Ensemble", "FrozenClassFeatures", "encode_class_templates", "resolve_templates"]


def _open_clip_templates(attr: str) -> list[str]:
    # open_clip ships CLIP's ImageNet templates as callables; evaluating them on "{}" turns
    # them back into format strings.
    from open_clip import zero_shot_metadata

    return [t("{}") for t in getattr(zero_shot_metadata, attr)]


def _promptsrc60() -> list[str]:
    # PromptSRC's reference code uses the first 60 of CLIP's 80 ImageNet templates, with
    # "a photo of a {}." (CLIP's 40th) moved to the front; the order only fixes the summation order.
    first60 = _open_clip_templates("OPENAI_IMAGENET_TEMPLATES")[:60]
    return [first60[39], *first60[:39], *first60[40:]]


def _named_sets() -> dict[str, list[str]]:
    return {
        "photo": ["a photo of a {}."],
        "imagenet7": _open_clip_templates("SIMPLE_IMAGENET_TEMPLATES"),
        "imagenet80": _open_clip_templates("OPENAI_IMAGENET_TEMPLATES"),
        "promptsrc60": _promptsrc60(),
    }


TEMPLATE_SETS: tuple[str, ...] = ("photo", "imagenet7", "imagenet80", "promptsrc60")

#: How several templates' features become one class feature: ``clip`` normalises each template's
#: features, averages and normalises again (CLIP's prompt ensembling); ``mean`` averages the raw
#: features (PromptSRC's reference code; normalised where they are used).
Ensemble = Literal["clip", "mean"]


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """Turn a set name (``photo``, ``imagenet7``, ``imagenet80``, ``promptsrc60``), a single template or a list of
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


@torch.no_grad()
def encode_class_templates(
    backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], ensemble: Ensemble = "clip"
) -> torch.Tensor:
    """Frozen class text features ``[C, D]`` from hand-written templates.

    Each prompt ends in one full stop (:func:`~vlprompt.data.classnames.fill_template`; CLIP's and
    CoOp's templates already end in one). One template gives the raw features (exactly plain
    CLIP); several are combined as ``ensemble`` says (see :data:`Ensemble`).
    """
    per_template = [backbone.encode_text([fill_template(t, c) for c in classnames]).float() for t in templates]
    if len(per_template) == 1:
        return per_template[0]
    if ensemble == "mean":
        return torch.stack(per_template, dim=1).mean(dim=1)
    if ensemble != "clip":
        raise ValueError(f"ensemble must be 'clip' or 'mean', not {ensemble!r}")
    return F.normalize(torch.stack([F.normalize(f, dim=-1) for f in per_template]).mean(0), dim=-1)


class FrozenClassFeatures:
    """Hand-written class features of the frozen model (zero-shot's classifier, the anchor of
    KgCoOp and PromptSRC), computed once per class list and device; L2-normalised unless
    ``normalize=False`` (raw single-template features are exactly plain CLIP's). Several templates
    are combined as ``ensemble`` says."""

    def __init__(self, templates: str | Sequence[str], normalize: bool = True, ensemble: Ensemble = "clip") -> None:
        if ensemble not in ("clip", "mean"):
            raise ValueError(f"ensemble must be 'clip' or 'mean', not {ensemble!r}")
        self.templates = resolve_templates(templates)
        self.normalize, self.ensemble = normalize, ensemble
        self._key: tuple | None = None
        self._features: torch.Tensor | None = None

    def __call__(self, backbone: Backbone, classnames: Sequence[str]) -> torch.Tensor:
        key = (tuple(classnames), backbone.device)
        if self._key != key:
            features = encode_class_templates(backbone, classnames, self.templates, self.ensemble)
            self._features = F.normalize(features.float(), dim=-1) if self.normalize else features
            self._key = key
        return self._features
