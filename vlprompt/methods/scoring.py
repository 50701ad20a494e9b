"""Class logits from a prompt learner's output: one scorer for training, evaluation, test-time
tuning and prediction, so every path scores exactly the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlprompt.backbones import Backbone
from vlprompt.prompts import PromptOutput

__all__ = ["prompt_logits"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when the features already are (exact checks in double precision)."""
    return x if x.dtype == torch.float64 else x.float()


def prompt_logits(output: PromptOutput, backbone: Backbone) -> torch.Tensor:
    """Class logits ``[B, C]`` (float32; float64 for float64 features).

    A learner with a learned head (VPT on a vision-only encoder) gives its logits itself. Otherwise
    the logits are CLIP's: the backbone's logit scale times the cosine similarity of the image
    features and the class text features (``[C, D]``, or ``[B, C, D]`` for per-image classifiers
    such as CoCoOp's), plus the backbone's logit bias when it has one (SigLIP).
    With a second head beside them (``head_logits``, decoupled DePT), the logits are
    ``(1 - head_weight) * clip + head_weight * head``.
    """
    if output.logits is not None:
        return _wide(output.logits)
    if output.image_features is None or output.text_features is None:
        raise ValueError("scoring needs image and text features (or logits from a learned head)")
    image = F.normalize(_wide(output.image_features), dim=-1)
    text = F.normalize(_wide(output.text_features), dim=-1)
    if text.dim() == 3:  # per-image classifiers
        logits = torch.einsum("bd,bcd->bc", image, text)
    else:
        logits = image @ text.t()
    logits = backbone.logit_scale.to(logits.dtype) * logits
    bias = backbone.logit_bias
    logits = logits if bias is None else logits + bias.to(logits.dtype)
    if output.head_logits is None:
        return logits
    return (1 - output.head_weight) * logits + output.head_weight * _wide(output.head_logits)
