"""The base of TuneVLSeg's two shared multimodal strategies (Adhikari et al., "TuneVLSeg: Prompt
Tuning Benchmark for Vision-Language Segmentation Models", ACCV 2024): one learned context per
prompt depth from which both towers' prompts are derived.

Layout, as TuneVLSeg's ``BaseSharedLearner`` with its CLIPSeg wrapper (``BaseMultimodalCLIPSeg``):
the text prompt of depth 0 follows the start token (CoOp's layout, class name after it), the
visual prompt of depth 0 is appended after the patch tokens before the image tower's pre-norm;
the prompts of depth ``i >= 1`` replace those tokens before block ``i`` of each tower. The context
is drawn from N(0, ``init_std``^2) (never from words: TuneVLSeg passes no initialiser).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.prompts.coop import CoOpPromptLearner
from vlprompt.prompts.ivlp import check_text_depth

__all__ = ["SharedPromptLearner"]


class SharedPromptLearner(CoOpPromptLearner):
    """A shared context ``ctx`` (``[depth, n_ctx, ctx_width]``) mapped to text and visual prompts
    by :meth:`layer_prompts` (subclasses). ``depth`` is at most the shallower tower's layer count,
    as TuneVLSeg's ``max_network_depth``."""

    uses_image_tower = True

    def __init__(self, backbone: Backbone, classnames: Sequence[str], *, n_ctx: int, depth: int, ctx_width: int,
                 init_std: float) -> None:
        backbone.check_visual_prompts()  # a clear error for towers without visual prompts
        limit = min(backbone.text_layers, backbone.vision_layers)
        if not 1 <= depth <= limit:
            raise ValueError(f"depth must be between 1 and {limit} (the shallower tower's layers), got {depth}")
        check_text_depth(backbone, depth)
        backbone.check_visual_prompts(depth)
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=None, init_std=init_std)
        self.depth = depth
        # CoOp's text-width context is replaced by the shared one.
        self.ctx = nn.Parameter(nn.init.normal_(torch.empty(depth, n_ctx, ctx_width), std=init_std))

    def layer_prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The text prompts (``[n_ctx, text_width]``) and visual prompts (``[n_ctx,
        vision_width]``) of every depth."""
        raise NotImplementedError

    def text_prompts(self) -> list[torch.Tensor]:
        return self.layer_prompts()[0]

    def visual_prompts(self) -> list[torch.Tensor]:
        return self.layer_prompts()[1]

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        text = self.text_prompts()
        return self.encode_prompts(text[0], text[1:])

    def image_prompts(self) -> tuple[list[torch.Tensor], str]:
        return self.visual_prompts(), "after_patches"

    def load_dassl_checkpoint(self, path: str) -> None:
        raise ValueError(f"the {self.name} prompt has no Dassl/CoOp checkpoint format; start from a saved vlprompt "
                         "prompt instead")
