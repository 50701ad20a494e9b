"""Deep CoCoOp as TuneVLSeg runs it: CoCoOp's image-conditioned context at the input and at deeper
text layers, each shifted by its own meta-net."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.prompts.base import register_prompt_learner
from vlprompt.prompts.coop import CoOpPromptLearner
from vlprompt.prompts.ivlp import check_text_depth
from vlprompt.prompts.projection import layer_at, mlp_projection, per_layer

__all__ = ["DeepCoCoOpPromptLearner"]


@register_prompt_learner("deep_cocoop")
class DeepCoCoOpPromptLearner(CoOpPromptLearner):
    """CoCoOp (Zhou et al., CVPR 2022) as TuneVLSeg implements it (Adhikari et al., ACCV 2024,
    "TuneVLSeg: Prompt Tuning Benchmark for Vision-Language Segmentation Models";
    ``CoCoOpContextLearner`` in ``COOPCLIPSeg``), deep.

    Each text depth ``i < depth`` has its own context ``[n_ctx, text_width]`` and meta-net; the
    meta-net maps the image's feature (CLIP's projected image embedding; normalised only with
    ``normalize_image_features``) to a shift added to every token of that context. Depth 0 follows
    the start token (before the class name), deeper ones replace those tokens before text block
    ``i``. With ``depth=1`` this is TuneVLSeg's CoCoOp. Its meta-net is TuneVLSeg's projection
    (:func:`~vlprompt.prompts.projection.mlp_projection`): ``Linear(embed_dim, hidden)`` with
    Kaiming-normal weights, ReLU, ``Linear(hidden, text_width)`` without bias, LayerNorm without
    bias; not the paper's ``Linear -> ReLU -> Linear`` over a normalised feature
    (:class:`~vlprompt.prompts.CoCoOpPromptLearner`). Text features are ``[B, C, D]``.

    Args:
        n_ctx, ctx_init: the depth-0 context as for :class:`CoOpPromptLearner` (TuneVLSeg: "a photo
            of a", 4 tokens); deeper contexts are drawn from N(0, ``init_std``^2).
        depth: text depths with a conditioned context (TuneVLSeg's config: 1).
        hidden: hidden width(s) of the meta-nets (TuneVLSeg: 64; None: one linear layer).
        proj_norm: the meta-nets' final LayerNorm (TuneVLSeg: True).
        unified_projection: one meta-net for every depth (TuneVLSeg's config: False).
        normalize_image_features: L2-normalise the image feature first (TuneVLSeg's config: False).
        init_std: std of the random contexts (0.02).
    """

    image_conditioned = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        depth: int = 1,
        hidden: int | list[int] | None = 64,
        proj_norm: bool = True,
        unified_projection: bool = False,
        normalize_image_features: bool = False,
        init_std: float = 0.02,
    ) -> None:
        check_text_depth(backbone, depth)
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        self.depth = depth
        self.normalize_image_features = normalize_image_features
        if depth > 1:
            self.deep_ctx = nn.Parameter(nn.init.normal_(torch.empty(depth - 1, self.n_ctx, backbone.text_width),
                                                         std=init_std))
        meta = mlp_projection(backbone.embed_dim, backbone.text_width, hidden, final_norm=proj_norm, final_bias=False)
        self.meta_nets = per_layer(meta, depth, unified_projection)

    def contexts(self, image_features: torch.Tensor) -> list[torch.Tensor]:
        """Each depth's context shifted for each image, ``[B, n_ctx, text_width]``."""
        dtype = self.ctx.dtype
        features = image_features.to(dtype)
        if self.normalize_image_features:
            features = F.normalize(features, dim=-1)
        bases = [self.ctx, *(self.deep_ctx if self.depth > 1 else [])]
        return [base[None] + layer_at(self.meta_nets, i)(features)[:, None] for i, base in enumerate(bases)]

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        if image_features is None:
            raise ValueError("deep CoCoOp's text features depend on the image: pass image_features")
        first, *deep = self.contexts(image_features)
        # The prompts are encoded image by image, each image's classes together: [B * C, n, D].
        deep = [d.repeat_interleave(self.num_classes, dim=0) for d in deep]
        return self.encode_prompts(first.unsqueeze(1), deep)

    def load_dassl_checkpoint(self, path: str) -> None:
        raise ValueError("deep CoCoOp has no Dassl/CoOp checkpoint format; start from a saved vlprompt prompt instead")
