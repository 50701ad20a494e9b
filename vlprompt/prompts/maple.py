"""MaPLe: vision prompts produced from the language prompts by coupling functions."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vlprompt.backbones import Backbone, PromptPlacement
from vlprompt.prompts.base import prompt_tokens, register_prompt_learner
from vlprompt.prompts.coop import CoOpPromptLearner, load_dassl_state_dict
from vlprompt.prompts.ivlp import check_text_depth, resolve_depth

__all__ = ["MaPLePromptLearner"]

# Fixed token embeddings the reference code keeps in its prompt learner's state.
_REFERENCE_BUFFERS = {"token_prefix", "token_suffix"}


@register_prompt_learner("maple")
class MaPLePromptLearner(CoOpPromptLearner):
    """Multi-modal Prompt Learning (Khattak et al., CVPR 2023, "MaPLe: Multi-modal Prompt
    Learning").

    Language prompts are learned at the first ``depth`` text layers (CoOp's context at the
    input, new tokens deeper); the visual prompts of the same layers are *projections* of them
    (one linear coupling function per layer), which ties the two towers together.

    Args:
        n_ctx, ctx_init: as for :class:`CoOpPromptLearner`; the paper learns the first two
            tokens of "a photo of a" and keeps "of a" fixed.
        depth: layers of both towers that get prompts; None = the paper's 9, or every layer of
            a shallower tower.
        placement: where visual tokens go (after the patches, as in the paper's code).
        init_std: std of the normal initialisation of the deep language prompts.
    """

    uses_image_tower = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 2,
        ctx_init: str | None = "a photo of a",
        depth: int | None = None,
        placement: PromptPlacement = "after_patches",
        init_std: float = 0.02,
    ) -> None:
        backbone.check_visual_prompts()  # a clear error for towers without visual prompts
        depth = resolve_depth(depth, backbone.text_layers, backbone.vision_layers)
        check_text_depth(backbone, depth)
        backbone.check_visual_prompts(depth)
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        self.depth = depth
        self.placement = placement
        text_width, vision_width = backbone.text_width, backbone.vision_width
        self.proj = nn.Linear(text_width, vision_width)
        if depth > 1:
            # Lists, named as in the reference code, so its checkpoints load as they are.
            self.compound_prompts_text = nn.ParameterList(
                prompt_tokens(self.n_ctx, text_width, std=init_std) for _ in range(depth - 1)
            )
            # The reference code copies one freshly initialised layer: all coupling functions
            # start equal and are trained apart.
            coupling = nn.Linear(text_width, vision_width)
            self.compound_prompt_projections = nn.ModuleList(copy.deepcopy(coupling) for _ in range(depth - 1))

    def deep_text_prompts(self) -> list[torch.Tensor]:
        return list(getattr(self, "compound_prompts_text", []))

    def visual_prompts(self) -> list[torch.Tensor]:
        """The visual prompt of each layer, coupled to that layer's language prompt."""
        deep = [f(p) for f, p in zip(getattr(self, "compound_prompt_projections", []), self.deep_text_prompts())]
        return [self.proj(self.ctx), *deep]

    def image_prompts(self) -> tuple[list[torch.Tensor], str]:
        return self.visual_prompts(), self.placement

    def load_dassl_checkpoint(self, path: str | Path) -> None:
        """Load every prompt tensor from a checkpoint of the MaPLe reference code."""
        state = load_dassl_state_dict(path)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own) - _REFERENCE_BUFFERS)
        if missing or unexpected:
            raise KeyError(
                f"{path}: not a MaPLe checkpoint for depth {self.depth} "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
        for key, value in own.items():
            if state[key].shape != value.shape:
                raise ValueError(
                    f"{path}: {key} has shape {tuple(state[key].shape)}, this prompt needs {tuple(value.shape)} "
                    "(n_ctx, depth and the backbone's widths must agree)"
                )
        self.load_state_dict({k: state[k].to(v.dtype) for k, v in own.items()})
