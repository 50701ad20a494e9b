"""CoCoOp: CoOp context shifted per image by a small meta-network."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.prompts.base import register_prompt_learner
from vlprompt.prompts.coop import ClassTokenPosition, CoOpPromptLearner, load_dassl_state_dict

__all__ = ["CoCoOpPromptLearner"]


@register_prompt_learner("cocoop")
class CoCoOpPromptLearner(CoOpPromptLearner):
    """Conditional Context Optimization (Zhou et al., CVPR 2022, "Conditional Prompt Learning for
    Vision-Language Models").

    A meta-net (``Linear -> ReLU -> Linear``, hidden width ``embed_dim // meta_reduction``) maps
    each normalised image feature to a bias added to every context vector, so each image gets its
    own classifier. Text features are ``[B, C, D]``; cost grows with batch size x classes.

    Args:
        n_ctx, ctx_init, class_token_position, init_std: as for :class:`CoOpPromptLearner`.
        meta_reduction: width reduction of the meta-net's hidden layer (16 in the paper).
    """

    image_conditioned = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        class_token_position: ClassTokenPosition = "end",
        init_std: float = 0.02,
        meta_reduction: int = 16,
    ) -> None:
        super().__init__(
            backbone,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            class_token_position=class_token_position,
            init_std=init_std,
        )
        hidden = max(1, backbone.embed_dim // meta_reduction)
        # Layer names follow the reference implementation so its checkpoints load as they are.
        self.meta_net = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(backbone.embed_dim, hidden),
                relu=nn.ReLU(inplace=True),
                linear2=nn.Linear(hidden, backbone.text_width),
            )
        )

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        if image_features is None:
            raise ValueError("CoCoOp's text features depend on the image: pass image_features")
        weights = self.meta_net.linear1.weight  # the meta-net's precision (fp32 under fp16 features)
        bias = self.meta_net(F.normalize(image_features.to(weights.dtype), dim=-1))  # [B, D_text]
        ctx = self.ctx.unsqueeze(0) + bias.unsqueeze(1)  # [B, n_ctx, D_text]
        return self.encode_prompts(ctx.unsqueeze(1))  # [B, C, D]

    def load_dassl_checkpoint(self, path: str | Path) -> None:
        """Load ``ctx`` and the meta-net from a CoCoOp reference checkpoint."""
        state = load_dassl_state_dict(path)
        self._copy_ctx(state, path)
        meta = {k.removeprefix("meta_net."): v for k, v in state.items() if k.startswith("meta_net.")}
        if not meta:
            raise KeyError(f"{path}: no meta_net weights in the checkpoint; is it a CoOp checkpoint?")
        try:
            self.meta_net.load_state_dict(meta)
        except RuntimeError as err:
            raise ValueError(f"{path}: meta-net weights do not fit this backbone ({err})") from err
