"""VPT: learned prompt tokens in the image tower; the text side stays hand-written."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from vlprompt.backbones import Backbone, PromptPlacement
from vlprompt.prompts.base import PromptLearner, PromptOutput, prompt_tokens, register_prompt_learner
from vlprompt.prompts.zeroshot import ZeroShotPrompt

__all__ = ["VPTPromptLearner", "VisualPromptInit", "visual_prompt_tokens", "xavier_uniform_bound"]

ClassifierHead = Literal["auto", "text", "linear"]

#: How random visual prompt tokens are drawn: ``normal`` (N(0, std^2), as MaPLe, IVLP and
#: PromptSRC) or ``xavier_uniform`` (U(-a, a) with :func:`xavier_uniform_bound`, as VPT's and
#: MVLPT's code).
VisualPromptInit = Literal["normal", "xavier_uniform"]


def xavier_uniform_bound(patch_size: Sequence[int], width: int) -> float:
    """The half-width ``a`` of the uniform range VPT's and MVLPT's code draw prompt tokens from:
    ``sqrt(6 / (3 * patch_h * patch_w + width))``, Xavier's bound for a layer from one RGB patch
    (fan-in) to the tower's width (fan-out). MVLPT (``trainers/mvlpt.py``) uses it for the
    input-layer and the deep tokens alike; about 0.0625 (std 0.036) on ViT-B/16."""
    fan_in = 3 * math.prod(int(p) for p in patch_size)
    return math.sqrt(6.0 / float(fan_in + width))


def visual_prompt_tokens(*shape: int, backbone: Backbone, init: VisualPromptInit = "normal",
                         std: float = 0.02) -> nn.Parameter:
    """Learnable visual prompt tokens of ``shape`` (last dimension the tower's width), drawn as
    ``init`` says (:data:`VisualPromptInit`); ``std`` is the normal draw's."""
    if init == "normal":
        return prompt_tokens(*shape, std=std)
    if init == "xavier_uniform":
        bound = xavier_uniform_bound(backbone.patch_size, backbone.vision_width)
        return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))
    raise ValueError(f"init must be normal or xavier_uniform, not {init!r}")


@register_prompt_learner("vpt")
class VPTPromptLearner(PromptLearner):
    """Visual Prompt Tuning (Jia et al., ECCV 2022, "Visual Prompt Tuning").

    ``n_tokens`` learned tokens join the image tower's sequence; with ``depth > 1`` (VPT-deep)
    each of the first ``depth`` layers gets its own tokens. Classes are scored against frozen
    hand-written text features (``head="text"``, as VPT is run on CLIP in MaPLe/MVLPT) or by a
    learned linear head (``head="linear"``, the paper's setting; needed for vision-only
    backbones).

    Args:
        n_tokens: prompt tokens per layer.
        depth: layers that get prompts (1 = VPT-shallow); None = every layer of the tower.
        placement: ``after_cls`` (the paper), ``after_patches`` (MaPLe's VPT baseline) or
            ``after_cls_after_pre_norm`` (MVLPT's code: the tokens join after ``ln_pre``); see
            :data:`~vlprompt.backbones.PromptPlacement`.
        head: ``text``, ``linear`` or ``auto`` (text when the backbone has a text tower).
        templates: hand-written templates for the text head (see :func:`resolve_templates`).
        init: ``normal`` (std ``init_std``) or ``xavier_uniform`` (VPT's and MVLPT's uniform
            range, :func:`xavier_uniform_bound`, for every layer's tokens).
        init_std: std of the normal initialisation of the tokens.
    """

    uses_image_tower = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_tokens: int = 8,
        depth: int | None = None,
        placement: PromptPlacement = "after_cls",
        head: ClassifierHead = "auto",
        templates: str | list[str] = "photo",
        init: VisualPromptInit = "normal",
        init_std: float = 0.02,
    ) -> None:
        if head not in ("auto", "text", "linear"):
            raise ValueError(f"head must be auto, text or linear, not {head!r}")
        depth = backbone.vision_layers if depth is None else depth
        backbone.check_visual_prompts(depth)
        if head == "auto":
            head = "text" if backbone.has_text else "linear"
        super().__init__(backbone, classnames)
        self.placement = placement
        self.head_type = head
        self.prompts = visual_prompt_tokens(depth, n_tokens, backbone.vision_width, backbone=backbone, init=init,
                                            std=init_std)
        self.zero_shot = ZeroShotPrompt(backbone, classnames, templates=templates) if head == "text" else None
        self.set_classnames(classnames)

    def _build_class_buffers(self, classnames: list[str]) -> None:
        if self.zero_shot is not None:
            self.zero_shot.set_classnames(classnames)
            return
        if hasattr(self, "head") and self.head.out_features != len(classnames):
            raise ValueError(
                f"a linear head is tied to its {self.head.out_features} classes; cannot switch to "
                f"{len(classnames)} classes (use head='text' to evaluate on new classes)"
            )
        if not hasattr(self, "head"):
            self.head = nn.Linear(self.backbone.embed_dim, len(classnames))

    def image_prompts(self) -> tuple[list[torch.Tensor], str]:
        return list(self.prompts), self.placement

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.zero_shot.text_features() if self.zero_shot is not None else None

    def forward(
        self, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> PromptOutput:
        output = super().forward(images, image_features)
        if self.zero_shot is None:
            output.logits = self.head(output.image_features.float())
        return output
