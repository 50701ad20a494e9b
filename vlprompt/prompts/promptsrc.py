"""PromptSRC: IVLP prompts kept close to the frozen model, aggregated across epochs."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlprompt.backbones import Backbone, PromptPlacement
from vlprompt.prompts.base import PromptOutput, register_prompt_learner
from vlprompt.prompts.ivlp import IVLPPromptLearner
from vlprompt.prompts.templates import FrozenClassFeatures

__all__ = ["PromptSRCPromptLearner", "gaussian_epoch_weights"]

log = logging.getLogger(__name__)


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """PromptSRC's aggregation weights: a Gaussian over epochs ``1..epochs``, normalised to sum 1."""
    if epochs < 1 or std <= 0:
        raise ValueError(f"need epochs >= 1 and std > 0, got {epochs} and {std}")
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
    total = sum(density)
    if total == 0.0:
        raise ValueError(f"the Gaussian (mean {mean}, std {std}) puts no weight on epochs 1..{epochs}")
    return [d / total for d in density]


@register_prompt_learner("promptsrc")
class PromptSRCPromptLearner(IVLPPromptLearner):
    """Self-regulating prompts (Khattak et al., ICCV 2023, "Self-regulating Prompts:
    Foundational Model Adaptation without Forgetting").

    IVLP prompts trained with three extra terms that keep them close to the frozen model:
    L1 between the prompted and frozen (template-ensembled) text features, L1 between the
    prompted and frozen image features, and KL from the zero-shot to the prompted logits. The
    prompts of all epochs are averaged with Gaussian weights over the epoch index (GPA); the
    average replaces the prompt when training ends.

    Args:
        n_ctx, ctx_init, text_depth, n_vision_tokens, vision_depth, placement, init_std:
            as for :class:`IVLPPromptLearner`.
        templates: hand-written templates whose ensemble gives the frozen text features.
        text_loss_weight, image_loss_weight, kl_loss_weight: weights of the three terms
            (25, 10, 1 in the paper).
        gpa_mean: epoch (counted from 1) where the aggregation weights peak; None = 3/4 of the
            run (the paper's 15 of 20 epochs).
        gpa_std: width of the Gaussian in epochs; 0 turns aggregation off.
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
        templates: str | list[str] = "imagenet80",
        text_loss_weight: float = 25.0,
        image_loss_weight: float = 10.0,
        kl_loss_weight: float = 1.0,
        gpa_mean: float | None = None,
        gpa_std: float = 1.0,
    ) -> None:
        self.frozen_text = FrozenClassFeatures(templates)
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
        self.hparams.update(
            templates=templates,
            text_loss_weight=text_loss_weight,
            image_loss_weight=image_loss_weight,
            kl_loss_weight=kl_loss_weight,
            gpa_mean=gpa_mean,
            gpa_std=gpa_std,
        )
        self.weights = (text_loss_weight, image_loss_weight, kl_loss_weight)
        self.gpa_mean, self.gpa_std = gpa_mean, gpa_std
        self._gpa_sum: dict[str, torch.Tensor] = {}
        self._gpa_weight = 0.0

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

    # -- Gaussian prompt aggregation ------------------------------------------------------------
    def on_train_epoch_end(self, epoch: int, max_epochs: int | None) -> None:
        if self.gpa_std <= 0:
            return
        if not max_epochs or max_epochs < 1:
            if epoch == 0:
                log.warning("PromptSRC: prompt aggregation needs trainer.max_epochs; keeping the last prompt")
            return
        mean = self.gpa_mean if self.gpa_mean is not None else 0.75 * max_epochs
        weight = gaussian_epoch_weights(max_epochs, mean, self.gpa_std)[min(epoch, max_epochs - 1)]
        with torch.no_grad():
            for name, param in self.named_parameters():
                contribution = weight * param.detach().float()
                self._gpa_sum[name] = self._gpa_sum[name] + contribution if name in self._gpa_sum else contribution
        self._gpa_weight += weight

    def on_train_end(self) -> None:
        if self._gpa_weight <= 0:
            return
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_((self._gpa_sum[name] / self._gpa_weight).to(param.dtype))
        log.info("PromptSRC: replaced the prompt by its Gaussian-weighted average over epochs")
        self._gpa_sum, self._gpa_weight = {}, 0.0

    def training_state(self) -> dict[str, torch.Tensor]:
        state = {f"gpa_sum.{k}": v for k, v in self._gpa_sum.items()}
        if state:
            state["gpa_weight"] = torch.tensor(self._gpa_weight, dtype=torch.float64)
        return state

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self._gpa_sum = {k.removeprefix("gpa_sum."): v for k, v in state.items() if k.startswith("gpa_sum.")}
        self._gpa_weight = float(state.get("gpa_weight", 0.0))
