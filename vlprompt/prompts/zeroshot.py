"""Zero-shot CLIP classification with hand-written templates (the baseline every method beats)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlprompt.backbones import Backbone
from vlprompt.prompts.base import PromptLearner, register_prompt_learner
from vlprompt.prompts.templates import FrozenClassFeatures

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
        super().__init__(backbone, classnames)
        self.class_features = FrozenClassFeatures(templates, normalize=False)
        self.set_classnames(classnames)

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        return self.class_features(self.backbone, self.classnames)
