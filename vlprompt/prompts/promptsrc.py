"""PromptSRC: IVLP prompts kept close to the frozen model, aggregated across epochs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlprompt.backbones import Backbone, PromptPlacement
from vlprompt.prompts.base import PromptOutput, register_prompt_learner
from vlprompt.prompts.ivlp import IVLPPromptLearner
from vlprompt.prompts.templates import Ensemble, FrozenClassFeatures

__all__ = ["PromptSRCPromptLearner"]



@register_prompt_learner("promptsrc")
class PromptSRCPromptLearner(IVLPPromptLearner):
    """Self-regulating prompts (Khattak et al., ICCV 2023, "Self-regulating Prompts:
    Foundational Model Adaptation without Forgetting").

    IVLP prompts trained with three extra terms that keep them close to the frozen model:
    L1 between the prompted and frozen (template-ensembled) text features, L1 between the
    prompted and frozen image features, and KL from the zero-shot to the prompted logits. The
    paper's Gaussian prompt aggregation over epochs (GPA) is a training-procedure matter, so it is
    the Lightning callback :class:`~vlprompt.methods.prompt_averaging.GaussianPromptAggregation`,
    added by ``configs/methods/promptsrc.yaml`` (``trainer.callbacks``); add it to your Trainer
    when training from Python.

    Args:
        n_ctx, ctx_init, text_depth, n_vision_tokens, vision_depth, placement, init_std:
            as for :class:`IVLPPromptLearner`.
        templates: hand-written templates of the frozen text anchor (``promptsrc60``: the 60 of
            CLIP's ImageNet templates the reference code uses).
        ensemble: how the templates' features are combined: ``mean`` (the reference code: raw
            mean of the unnormalised features, normalised where used) or ``clip`` (CLIP's
            ensembling: mean of normalised features, e.g. with ``templates: imagenet80``).
        text_loss_weight, image_loss_weight, kl_loss_weight: weights of the three terms
            (25, 10, 1 in the paper).
    """

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
        templates: str | list[str] = "promptsrc60",
        ensemble: Ensemble = "mean",
        text_loss_weight: float = 25.0,
        image_loss_weight: float = 10.0,
        kl_loss_weight: float = 1.0,
    ) -> None:
        self.frozen_text = FrozenClassFeatures(templates, ensemble=ensemble)
        super().__init__(
            backbone,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            text_depth=text_depth,
            n_vision_tokens=n_vision_tokens,
            vision_depth=vision_depth,
            placement=placement,
            init_std=init_std,
        )
        self.weights = (text_loss_weight, image_loss_weight, kl_loss_weight)

    # -- the frozen model's view -----------------------------------------------------------------
    def forward(
        self, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> PromptOutput:
        output = super().forward(images, image_features)
        if self.training and images is not None:
            with torch.no_grad():
                output.extras["frozen_image_features"] = self.backbone.encode_image(images)
        return output

    def extra_loss(self, output: PromptOutput, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if "frozen_image_features" not in output.extras:
            raise ValueError("PromptSRC's loss needs the images: call the prompt learner with images= in training mode")
        text_weight, image_weight, kl_weight = self.weights
        frozen_text = self.frozen_text(self.backbone, self.classnames)
        frozen_image = F.normalize(output.extras["frozen_image_features"].float(), dim=-1)
        text = F.normalize(output.text_features.float(), dim=-1)
        image = F.normalize(output.image_features.float(), dim=-1)
        zero_shot_logits = self.backbone.logit_scale.float() * frozen_image @ frozen_text.t()
        kl = F.kl_div(
            F.log_softmax(logits.float(), dim=-1),
            F.log_softmax(zero_shot_logits, dim=-1),
            reduction="sum",
            log_target=True,
        ) / logits.numel()
        return (
            text_weight * F.l1_loss(text, frozen_text)
            + image_weight * F.l1_loss(image, frozen_image)
            + kl_weight * kl
        )
