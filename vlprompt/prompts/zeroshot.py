"""Zero-shot CLIP classification with hand-written templates (the baseline every method beats)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlprompt.backbones import Backbone
from vlprompt.prompts.base import PromptLearner, register_prompt_learner
from vlprompt.prompts.templates import encode_class_templates, resolve_templates

__all__ = ["ZeroShotPrompt"]


@register_prompt_learner("zeroshot")
class ZeroShotPrompt(PromptLearner):
    """Zero-shot classifier from hand-written templates (Radford et al., ICML 2021, "Learning
    Transferable Visual Models From Natural Language Supervision").

    With several templates the class feature is the normalised mean of the normalised
    per-template features (prompt ensembling). No learnable parameters.

    Args:
        templates: a template such as ``"a photo of a {}."``, a list of them, or a named set
            (``photo``, ``imagenet7``, ``imagenet80``).
    """

    def __init__(
        self, backbone: Backbone, classnames: Sequence[str], *, templates: str | list[str] = "photo"
    ) -> None:
        backbone.require_text()
        super().__init__(backbone, classnames, templates=templates)
        self.templates = resolve_templates(templates)
        self._cache: torch.Tensor | None = None
        self.set_classnames(classnames)

    def _build_class_buffers(self, classnames: list[str]) -> None:
        self._cache = None

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        if self._cache is None or self._cache.device != self.backbone.device:
            self._cache = encode_class_templates(self.backbone, self.classnames, self.templates)
        return self._cache
