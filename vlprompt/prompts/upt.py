"""UPT: one unified prompt, refined by a small transformer layer, feeds both towers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlprompt.backbones import Backbone, PromptPlacement
from vlprompt.prompts.base import prompt_tokens, register_prompt_learner
from vlprompt.prompts.coop import ClassTokenPosition, CoOpPromptLearner
from vlprompt.prompts.ivlp import check_text_depth
from vlprompt.prompts.vpt import VisualPromptInit, visual_prompt_tokens

__all__ = ["MVLPTUPTPromptLearner", "UPTPromptLearner", "quick_gelu"]


@register_prompt_learner("upt")
class UPTPromptLearner(CoOpPromptLearner):
    """Unified Prompt Tuning (Zang et al., 2022, "Unified Vision and Language Prompt Learning"),
    as its paper describes it.

    A unified prompt of ``n_ctx`` tokens per layer, in the text width, goes through one
    self-attention layer (pre-norm, as in CLIP) that lets the tokens of all layers exchange
    information. The result is used as is for the text context (and deep text prompts), and
    mapped by a linear layer to the image width for the visual prompts. MVLPT's code runs UPT
    otherwise (separate text and visual tokens, which never exchange information):
    :class:`MVLPTUPTPromptLearner`.

    Args:
        n_ctx, ctx_init: the unified prompt's tokens per layer and their initialisation (random,
            as in the paper, or words via the token embeddings).
        depth: layers of both towers that get prompts (1 = the inputs only, as in the paper).
        placement: where visual tokens go (a :data:`~vlprompt.backbones.PromptPlacement`; MVLPT's code
            puts them after the class token and after the pre-norm, ``after_cls_after_pre_norm``).
        heads: attention heads of the refining layer (must divide the text width).
        init_std: std of the normal initialisation of random prompt tokens.
    """

    uses_image_tower = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = None,
        depth: int = 1,
        placement: PromptPlacement = "after_cls",
        heads: int = 1,
        init_std: float = 0.02,
    ) -> None:
        check_text_depth(backbone, depth)
        backbone.check_visual_prompts(depth)
        if backbone.text_width % heads:
            raise ValueError(f"heads={heads} must divide the text width {backbone.text_width}")
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        self.placement = placement
        width = backbone.text_width
        if depth > 1:
            self.deep_ctx = prompt_tokens(depth - 1, self.n_ctx, width, std=init_std)
        self.mixer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.vision_proj = nn.Linear(width, backbone.vision_width)

    def unified_prompts(self) -> torch.Tensor:
        """The refined unified prompt, ``[depth, n_ctx, text_width]``."""
        tokens = self.ctx.unsqueeze(0)
        if hasattr(self, "deep_ctx"):
            tokens = torch.cat([tokens, self.deep_ctx], dim=0)
        depth, n, width = tokens.shape
        return self.mixer(tokens.reshape(1, depth * n, width)).reshape(depth, n, width)

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        unified = self.unified_prompts()
        return self.encode_prompts(unified[0], list(unified[1:]))

    def image_prompts(self) -> tuple[list[torch.Tensor], str]:
        return list(self.vision_proj(self.unified_prompts())), self.placement


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (the MLP activation of CLIP's blocks)."""
    return x * torch.sigmoid(1.702 * x)


@register_prompt_learner("mvlpt_upt")
class MVLPTUPTPromptLearner(CoOpPromptLearner):
    """UPT as MVLPT's code runs it (Shen et al., WACV 2024, "Multitask Vision-Language Prompt
    Tuning"; ``MultitaskVLPromptLearner`` in ``trainers/mvlpt.py`` with CoOp and VPT tokens and
    ``PROJECT_METHOD transformer``).

    Two sets of learned tokens: CoOp's text context (``n_ctx`` tokens, normal init) and VPT's
    visual tokens (``n_tokens`` per layer for the first ``vision_depth`` image layers,
    Xavier-uniform by default). Each token is mapped to ``proj_dim`` wide (a linear map per tower,
    none when a tower is already that wide), goes through one CLIP residual attention block (one
    head, pre-norm, MLP of 4x width with QuickGELU) and is mapped back. The reference hands that
    block the tokens as ``[1, T, proj_dim]`` while CLIP's blocks read ``[length, batch, width]``:
    a sequence of length 1 per token, so each token attends to itself only (the attention is
    ``out_proj(v_proj(ln_1(x)))``) and the text and visual tokens never exchange information;
    this learner runs each token as its own sequence in the same way. The text context then
    builds CoOp's prompts; the visual tokens join the image tower after its pre-norm
    (``after_cls_after_pre_norm``), the first layer's at the input, the others replacing them
    before blocks ``1..`` (text prompts at the input only, as in the reference).

    Args:
        n_ctx, ctx_init, class_token_position: the text context, as for
            :class:`~vlprompt.prompts.CoOpPromptLearner` (MVLPT's scripts: ``middle``).
        n_tokens: visual tokens per layer (default: ``n_ctx``, as MVLPT's scripts set both).
        vision_depth: image layers that get tokens; None = every layer (MVLPT's ``VPT.DEEP``).
        placement: where the visual tokens go.
        proj_dim: the block's width (MVLPT's ``PROJECT_DIM``, 128).
        init: the visual tokens' draw (``xavier_uniform`` as MVLPT, or ``normal``).
        init_std: std of the normal draws (the text context; the visual tokens with ``normal``).
    """

    uses_image_tower = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = None,
        class_token_position: ClassTokenPosition = "middle",
        n_tokens: int | None = None,
        vision_depth: int | None = None,
        placement: PromptPlacement = "after_cls_after_pre_norm",
        proj_dim: int = 128,
        init: VisualPromptInit = "xavier_uniform",
        init_std: float = 0.02,
    ) -> None:
        vision_depth = backbone.vision_layers if vision_depth is None else vision_depth
        backbone.check_visual_prompts(vision_depth)
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init,
                         class_token_position=class_token_position, init_std=init_std)
        self.placement = placement
        n_tokens = self.n_ctx if n_tokens is None else n_tokens
        text_width, vision_width = backbone.text_width, backbone.vision_width
        self.visual_ctx = visual_prompt_tokens(vision_depth, n_tokens, vision_width, backbone=backbone, init=init,
                                               std=init_std)
        self.text_in, self.text_out = _width_maps(text_width, proj_dim)
        self.vision_in, self.vision_out = _width_maps(vision_width, proj_dim)
        self.mixer = nn.TransformerEncoderLayer(proj_dim, 1, dim_feedforward=4 * proj_dim, dropout=0.0,
                                                activation=quick_gelu, batch_first=True, norm_first=True)

    def mixed_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The text context (``ctx``'s shape) and the visual tokens ``[vision_depth, n_tokens,
        vision_width]`` after the block, every token on its own."""
        text = self.text_in(self.ctx.reshape(-1, self.ctx.shape[-1]))
        visual = self.vision_in(self.visual_ctx.reshape(-1, self.visual_ctx.shape[-1]))
        tokens = torch.cat([text, visual]).unsqueeze(1)  # [T, 1, proj_dim]: each its own sequence
        mixed = self.mixer(tokens).squeeze(1)
        text, visual = mixed[: len(text)], mixed[len(text):]
        return self.text_out(text).reshape(self.ctx.shape), self.vision_out(visual).reshape(self.visual_ctx.shape)

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_prompts(self.mixed_prompts()[0])

    def image_prompts(self) -> tuple[list[torch.Tensor], str]:
        return list(self.mixed_prompts()[1]), self.placement


def _width_maps(width: int, proj_dim: int) -> tuple[nn.Module, nn.Module]:
    """Linear maps ``width -> proj_dim`` and back (MVLPT's ``mvlpt_proj_ctx_*_pre/post``),
    identities when the widths agree."""
    if width == proj_dim:
        return nn.Identity(), nn.Identity()
    return nn.Linear(width, proj_dim), nn.Linear(proj_dim, width)
