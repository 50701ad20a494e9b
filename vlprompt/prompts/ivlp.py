"""IVLP: independent deep prompts in the text and the image tower."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlprompt.backbones import Backbone, PromptPlacement
from vlprompt.prompts.base import prompt_tokens, register_prompt_learner
from vlprompt.prompts.coop import CoOpPromptLearner

__all__ = ["IVLPPromptLearner", "PAPER_DEPTH", "check_text_depth", "resolve_depth"]

#: Prompted layers in MaPLe, IVLP and PromptSRC (of ViT-B/16's 12).
PAPER_DEPTH = 9


def resolve_depth(depth: int | None, *layers: int) -> int:
    """``depth``, or when None the papers' depth of 9 capped at the shallowest tower given."""
    return min(PAPER_DEPTH, *layers) if depth is None else depth


def check_text_depth(backbone: Backbone, depth: int) -> None:
    """Raise unless the text tower has at least ``depth`` layers for deep text prompts."""
    if not 1 <= depth <= backbone.text_layers:
        raise ValueError(f"text prompt depth must be between 1 and the text tower's {backbone.text_layers} layers, got {depth}")


@register_prompt_learner("ivlp")
class IVLPPromptLearner(CoOpPromptLearner):
    """Independent Vision-Language Prompting, the baseline of MaPLe (Khattak et al., CVPR 2023,
    "MaPLe: Multi-modal Prompt Learning") and the prompts PromptSRC regularises.

    The text tower gets CoOp's context plus new context tokens before each of its first
    ``text_depth`` layers; the image tower gets VPT tokens at its first ``vision_depth`` layers.
    The two sets are learned independently.

    Args:
        n_ctx, ctx_init: the text context, as for :class:`CoOpPromptLearner`.
        text_depth: text layers with prompts (1 = the input only, i.e. CoOp); None = the
            paper's 9, or every layer of a shallower tower.
        n_vision_tokens: visual prompt tokens per layer.
        vision_depth: image layers with prompts (0 = none); None as for ``text_depth``.
        placement: where visual tokens go (``after_patches`` as in the reference code).
        init_std: std of the normal initialisation of deep and visual prompts.
    """

    uses_image_tower = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        text_depth: int | None = None,
        n_vision_tokens: int = 4,
        vision_depth: int | None = None,
        placement: PromptPlacement = "after_patches",
        init_std: float = 0.02,
    ) -> None:
        if vision_depth != 0:
            backbone.check_visual_prompts()  # a clear error for towers without visual prompts
        text_depth = resolve_depth(text_depth, backbone.text_layers)
        vision_depth = resolve_depth(vision_depth, backbone.vision_layers or 0)
        check_text_depth(backbone, text_depth)
        if vision_depth:
            backbone.check_visual_prompts(vision_depth)
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        self.placement = placement
        if text_depth > 1:
            self.text_prompts = prompt_tokens(text_depth - 1, self.n_ctx, backbone.text_width, std=init_std)
        if vision_depth:
            self.vision_prompts = prompt_tokens(vision_depth, n_vision_tokens, backbone.vision_width, std=init_std)

    def deep_text_prompts(self) -> list[torch.Tensor]:
        return list(self.text_prompts) if hasattr(self, "text_prompts") else []

    def image_prompts(self) -> tuple[list[torch.Tensor] | None, str]:
        if not hasattr(self, "vision_prompts"):
            return None, self.placement
        return list(self.vision_prompts), self.placement
