"""TuneVLSeg's shared-separate strategy: one shared context, mapped to each tower by its own
projection."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlprompt.backbones import Backbone
from vlprompt.prompts.base import register_prompt_learner
from vlprompt.prompts.projection import layer_at, mlp_projection, per_layer
from vlprompt.prompts.shared import SharedPromptLearner

__all__ = ["SharedSeparatePromptLearner"]


@register_prompt_learner("shared_separate")
class SharedSeparatePromptLearner(SharedPromptLearner):
    """Shared-separate prompts (Adhikari et al., ACCV 2024, "TuneVLSeg: Prompt Tuning Benchmark
    for Vision-Language Segmentation Models"; its ``SharedSeparateLearner``).

    A context of ``shared_dim``-wide tokens per depth is projected to the text width and,
    separately, to the image width: the two towers' prompts are tied through the context they
    share, not through each other (unlike MaPLe, where the visual prompt is a projection of the
    text prompt). Layout and depths: :mod:`vlprompt.prompts.shared`.

    Args:
        n_ctx: context tokens per depth (TuneVLSeg: 4).
        depth: prompt depth in both towers (TuneVLSeg's config: 1; its search: 1 to 10).
        shared_dim: width of the shared context (TuneVLSeg: 64).
        unified_projection: one projection pair for every depth (else one per depth, all starting
            equal; TuneVLSeg's config: False).
        hidden: hidden widths of the projections (None: one linear layer, TuneVLSeg's config);
            see :func:`~vlprompt.prompts.projection.mlp_projection`.
        proj_norm: a final LayerNorm in each projection (only with ``hidden``; TuneVLSeg's
            config sets it, which has no effect without hidden layers).
        init_std: std of the context's normal initialisation (0.02).

    TuneVLSeg's LoRA-style projection (``use_lora_proj``, off in its configs) is not offered.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        depth: int = 1,
        shared_dim: int = 64,
        unified_projection: bool = False,
        hidden: int | list[int] | None = None,
        proj_norm: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(backbone, classnames, n_ctx=n_ctx, depth=depth, ctx_width=shared_dim, init_std=init_std)
        self.text_projections = per_layer(mlp_projection(shared_dim, backbone.text_width, hidden, final_norm=proj_norm),
                                          depth, unified_projection)
        self.visual_projections = per_layer(
            mlp_projection(shared_dim, backbone.vision_width, hidden, final_norm=proj_norm), depth, unified_projection)

    def text_prompts(self) -> list[torch.Tensor]:
        return [layer_at(self.text_projections, i)(self.ctx[i]) for i in range(self.depth)]

    def visual_prompts(self) -> list[torch.Tensor]:
        return [layer_at(self.visual_projections, i)(self.ctx[i]) for i in range(self.depth)]

    def layer_prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.text_prompts(), self.visual_prompts()
