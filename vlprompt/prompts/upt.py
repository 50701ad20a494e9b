"""UPT: one unified prompt, refined by a small transformer layer, feeds both towers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlprompt.backbones import Backbone, PromptPlacement
from vlprompt.prompts.base import prompt_tokens, register_prompt_learner
from vlprompt.prompts.coop import CoOpPromptLearner
from vlprompt.prompts.ivlp import check_text_depth

__all__ = ["UPTPromptLearner"]


@register_prompt_learner("upt")
class UPTPromptLearner(CoOpPromptLearner):
    """Unified Prompt Tuning (Zang et al., 2022, "Unified Vision and Language Prompt Learning"),
    the single-task form of the prompts MVLPT shares across tasks (Shen et al., WACV 2024,
    "Multitask Vision-Language Prompt Tuning").

    A unified prompt of ``n_ctx`` tokens per layer, in the text width, goes through one
    self-attention layer (pre-norm, as in CLIP) that lets the tokens of all layers exchange
    information. The result is used as is for the text context (and deep text prompts), and
    mapped by a linear layer to the image width for the visual prompts.

    Args:
        n_ctx, ctx_init: the unified prompt's tokens per layer and their initialisation (random,
            as in the paper, or words via the token embeddings).
        depth: layers of both towers that get prompts (1 = the inputs only, as in the paper).
        placement: where visual tokens go (after the class token, as in MVLPT).
        heads: attention heads of the refining layer (must divide the text width).
        init_std: std of the normal initialisation of random prompt tokens.
    """

    uses_image_tower = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = None,
        depth: int = 1,
        placement: PromptPlacement = "after_cls",
        heads: int = 1,
        init_std: float = 0.02,
    ) -> None:
        check_text_depth(backbone, depth)
        backbone.check_visual_prompts(depth)
        if backbone.text_width % heads:
            raise ValueError(f"heads={heads} must divide the text width {backbone.text_width}")
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        self.placement = placement
        width = backbone.text_width
        if depth > 1:
            self.deep_ctx = prompt_tokens(depth - 1, self.n_ctx, width, std=init_std)
        self.mixer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.vision_proj = nn.Linear(width, backbone.vision_width)

    def unified_prompts(self) -> torch.Tensor:
        """The refined unified prompt, ``[depth, n_ctx, text_width]``."""
        tokens = self.ctx.unsqueeze(0)
        if hasattr(self, "deep_ctx"):
            tokens = torch.cat([tokens, self.deep_ctx], dim=0)
        depth, n, width = tokens.shape
        return self.mixer(tokens.reshape(1, depth * n, width)).reshape(depth, n, width)

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        unified = self.unified_prompts()
        return self.encode_prompts(unified[0], list(unified[1:]))

    def image_prompts(self) -> tuple[list[torch.Tensor], str]:
        return list(self.vision_proj(self.unified_prompts())), self.placement
