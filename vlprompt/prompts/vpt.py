"""VPT: learned prompt tokens in the image tower; the text side stays hand-written."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from vlprompt.backbones import Backbone, PromptPlacement
from vlprompt.prompts.base import PromptLearner, PromptOutput, prompt_tokens, register_prompt_learner
from vlprompt.prompts.zeroshot import ZeroShotPrompt

__all__ = ["VPTPromptLearner"]

ClassifierHead = Literal["auto", "text", "linear"]


@register_prompt_learner("vpt")
class VPTPromptLearner(PromptLearner):
    """Visual Prompt Tuning (Jia et al., ECCV 2022, "Visual Prompt Tuning").

    ``n_tokens`` learned tokens join the image tower's sequence; with ``depth > 1`` (VPT-deep)
    each of the first ``depth`` layers gets its own tokens. Classes are scored against frozen
    hand-written text features (``head="text"``, as VPT is run on CLIP in MaPLe/MVLPT) or by a
    learned linear head (``head="linear"``, the paper's setting; needed for vision-only
    backbones).

    Args:
        n_tokens: prompt tokens per layer.
        depth: layers that get prompts (1 = VPT-shallow); None = every layer of the tower.
        placement: ``after_cls`` (the paper) or ``after_patches`` (MaPLe's VPT baseline).
        head: ``text``, ``linear`` or ``auto`` (text when the backbone has a text tower).
        templates: hand-written templates for the text head (see :func:`resolve_templates`).
        init_std: std of the normal initialisation of the tokens.
    """

    uses_image_tower = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_tokens: int = 8,
        depth: int | None = None,
        placement: PromptPlacement = "after_cls",
        head: ClassifierHead = "auto",
        templates: str | list[str] = "photo",
        init_std: float = 0.02,
    ) -> None:
        if head not in ("auto", "text", "linear"):
            raise ValueError(f"head must be auto, text or linear, not {head!r}")
        depth = backbone.vision_layers if depth is None else depth
        backbone.check_visual_prompts(depth)
        if head == "auto":
            head = "text" if backbone.has_text else "linear"
        super().__init__(backbone, classnames)
        self.placement = placement
        self.head_type = head
        self.prompts = prompt_tokens(depth, n_tokens, backbone.vision_width, std=init_std)
        self.zero_shot = ZeroShotPrompt(backbone, classnames, templates=templates) if head == "text" else None
        self.set_classnames(classnames)

    def _build_class_buffers(self, classnames: list[str]) -> None:
        if self.zero_shot is not None:
            self.zero_shot.set_classnames(classnames)
            return
        if hasattr(self, "head") and self.head.out_features != len(classnames):
            raise ValueError(
                f"a linear head is tied to its {self.head.out_features} classes; cannot switch to "
                f"{len(classnames)} classes (use head='text' to evaluate on new classes)"
            )
        if not hasattr(self, "head"):
            self.head = nn.Linear(self.backbone.embed_dim, len(classnames))

    def image_prompts(self) -> tuple[list[torch.Tensor], str]:
        return list(self.prompts), self.placement

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.zero_shot.text_features() if self.zero_shot is not None else None

    def forward(
        self, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> PromptOutput:
        output = super().forward(images, image_features)
        if self.zero_shot is None:
            output.logits = self.head(output.image_features.float())
        return output
