"""KgCoOp: CoOp kept close to the hand-written prompt's class features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlprompt.backbones import Backbone
from vlprompt.prompts.base import PromptOutput, register_prompt_learner
from vlprompt.prompts.coop import CoOpPromptLearner
from vlprompt.prompts.templates import FrozenClassFeatures

__all__ = ["KgCoOpPromptLearner"]


@register_prompt_learner("kgcoop")
class KgCoOpPromptLearner(CoOpPromptLearner):
    """Knowledge-guided Context Optimization (Yao et al., CVPR 2023, "Visual-Language Prompt
    Tuning with Knowledge-guided Context Optimization").

    Adds ``weight * (1 - mean_c cos(t_c, t0_c))`` to the loss, where ``t_c`` is the learned
    class text feature and ``t0_c`` the frozen hand-written one (as in the reference code; for
    unit vectors this is half the paper's mean squared distance). Starting from the hand-written
    prompt, the term is zero.

    Args:
        n_ctx, ctx_init: as for :class:`CoOpPromptLearner` (the paper starts from "a photo of a").
        templates: the hand-written template(s) of the frozen features (one per dataset in the
            paper, e.g. ``"a photo of a {}, a type of pet."``).
        weight: weight of the term (8.0 for base-to-novel in the paper).
        init_std: as for :class:`CoOpPromptLearner`.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        templates: str | list[str] = "photo",
        weight: float = 8.0,
        init_std: float = 0.02,
    ) -> None:
        self.frozen_text = FrozenClassFeatures(templates)
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        self.weight = weight

    def extra_loss(self, output: PromptOutput, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        learned = F.normalize(output.text_features.float(), dim=-1)
        return self.weight * (1.0 - (learned * self.frozen_text(self.backbone, self.classnames)).sum(-1).mean())
