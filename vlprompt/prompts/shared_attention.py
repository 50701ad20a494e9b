"""TuneVLSeg's shared-attention strategy: one context as wide as both towers together, passed
through a transformer encoder layer and split between them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.prompts.base import register_prompt_learner
from vlprompt.prompts.projection import layer_at, per_layer
from vlprompt.prompts.shared import SharedPromptLearner

__all__ = ["SharedAttentionPromptLearner"]


@register_prompt_learner("shared_attention")
class SharedAttentionPromptLearner(SharedPromptLearner):
    """Shared-attention prompts (Adhikari et al., ACCV 2024, "TuneVLSeg: Prompt Tuning Benchmark
    for Vision-Language Segmentation Models"; its ``SharedAttnLearner``).

    Each depth's context has ``text_width + vision_width`` channels. A PyTorch
    ``TransformerEncoderLayer`` over the whole width (ReLU, sequence-first as PyTorch's default)
    maps it; the first ``text_width`` channels of each output token are the text prompt, the rest
    the visual prompt. As in TuneVLSeg the context is fed as ``ctx[i].unsqueeze(0)`` to a
    sequence-first layer, i.e. as ``n_ctx`` sequences of one token: the attention of each token sees
    only itself, so the layer acts token by token (pre-norm, value and output projections,
    feed-forward, residuals); what ties the towers is that one token's channels are mixed. In
    training one pass of the layer (one dropout draw) serves both towers: whichever tower asks first
    computes it and keeps the other tower's half for the next request, which TuneVLSeg does with
    its two caches. Layout and depths: :mod:`vlprompt.prompts.shared`.

    Args:
        n_ctx: context tokens per depth (TuneVLSeg: 4).
        depth: prompt depth in both towers (TuneVLSeg's config: 1; its search: 1 to 10).
        heads, feedforward, dropout, norm_first: the layer's ``nhead``, ``dim_feedforward``,
            ``dropout`` and ``norm_first`` (TuneVLSeg's config: 16, 1536, 0.25, True). ``heads``
            must divide ``text_width + vision_width``.
        unified_projection: one layer for every depth (else one per depth, all starting equal;
            TuneVLSeg's config: False).
        init_std: std of the context's normal initialisation (0.02).
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        depth: int = 1,
        heads: int = 16,
        feedforward: int = 1536,
        dropout: float = 0.25,
        norm_first: bool = True,
        unified_projection: bool = False,
        init_std: float = 0.02,
    ) -> None:
        backbone.check_visual_prompts()  # a tower without visual prompts is refused first, in its words
        width = backbone.text_width + backbone.vision_width
        if width % heads:
            raise ValueError(f"heads={heads} must divide the joint width {width} (text {backbone.text_width} + "
                             f"vision {backbone.vision_width})")
        super().__init__(backbone, classnames, n_ctx=n_ctx, depth=depth, ctx_width=width, init_std=init_std)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=feedforward, dropout=dropout,
                                           norm_first=norm_first)
        self.mixers = per_layer(layer, depth, unified_projection)
        #: the half of a training pass not yet asked for: side -> (parameter versions, prompts)
        self._pending: dict[str, tuple[tuple[int, ...], list[torch.Tensor]]] = {}

    def layer_prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        split = self.backbone.text_width
        mixed = [layer_at(self.mixers, i)(self.ctx[i].unsqueeze(0)).squeeze(0) for i in range(self.depth)]
        return [m[:, :split] for m in mixed], [m[:, split:] for m in mixed]

    def text_prompts(self) -> list[torch.Tensor]:
        return self._half("text")

    def visual_prompts(self) -> list[torch.Tensor]:
        return self._half("visual")

    def _half(self, side: str) -> list[torch.Tensor]:
        """One tower's prompts: the half a training pass kept for it (the parameters unchanged
        since), else a new pass whose other half is kept. Outside training the layer is
        deterministic and nothing is kept."""
        versions = tuple(p._version for p in self.parameters())
        kept = self._pending.pop(side, None)
        if kept is not None and kept[0] == versions:
            return kept[1]
        text, visual = self.layer_prompts()
        if self.training:
            self._pending = {"visual" if side == "text" else "text": (versions, visual if side == "text" else text)}
        return text if side == "text" else visual
