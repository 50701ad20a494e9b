"""DePT: decomposed prompt tuning (Shi & Lipani, "DePT: Decomposed Prompt Tuning for
Parameter-Efficient Fine-tuning", ICLR 2024), on CLIP's text tower.

A short soft prompt (CoOp's context, ``n_ctx`` tokens) plus a low-rank update ``A @ B`` of the frozen
input token embeddings of the class prompt: ``A`` is ``[positions, rank]``, ``B`` is ``[rank, width]``.
Row ``i`` of ``scale * A @ B`` is added to the ``i``-th frozen token of the prompt (start token, class
name, full stop, end token, padding), the learned context excluded, as the reference adds it to the
input tokens before the soft prompt joins them. As in the reference code, ``A`` starts
Kaiming-uniform (``a = sqrt(5)``), ``B`` at zero (so training starts from plain CoOp), and the
update is scaled by ``alpha / sqrt(rank)`` with ``alpha = 8``. The reference tunes the two parts
with two learning rates; ``lowrank_lr`` gives the update its own (the optimiser config's rate stays
the prompt's).

On causal text towers only the rows up to the longest end-of-text token are computed (the rest
cannot change the pooled feature: exact and cheaper); on bidirectional towers every row counts.
The default ``rank`` matches the parameter count of 16-token CoOp at ``n_ctx`` tokens:
``n_ctx * width + rank * (positions + width) ~= 16 * width``.

Where vlprompt differs (its reading for CLIP):
- The reference (T5, NLP) pads every input to its maximum length, so each row of ``A`` has one
  position; here a row's position is counted among the prompt's frozen tokens.
- The update is also multiplied by the RMS of the backbone's token embeddings (of "a photo of a"),
  so ``alpha`` is in units of one input token. T5's embeddings are orders of magnitude larger than
  CLIP's (RMS about 0.02 to 0.04), and the reference's raw ``alpha = 8`` swamps CLIP's tokens: on the
  embedded default, base-to-novel accuracy fell from 99.6% (CoOp) to about 26%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.prompts.base import register_prompt_learner
from vlprompt.prompts.coop import CoOpPromptLearner

__all__ = ["DePTPromptLearner", "matching_rank"]

#: The fixed text whose token embeddings measure the scale of a backbone's embedding table.
_REFERENCE_TEXT = "a photo of a"


def _embedding_rms(backbone: Backbone) -> float:
    """Root mean square of the token embeddings of :data:`_REFERENCE_TEXT` (its special tokens
    included, padding not): the typical size of one input token of this text tower."""
    ids = backbone.tokenize([_REFERENCE_TEXT])
    pad = backbone.tokenize([""])[0, -1]  # the empty text is padding after its special tokens
    with torch.no_grad():
        return float(backbone.token_embedding(ids)[0, ids[0] != pad].float().pow(2).mean().sqrt())


def matching_rank(n_ctx: int, positions: int, width: int, budget_tokens: int = 16) -> int:
    """The rank whose DePT parameter count is closest to ``budget_tokens``-token CoOp's."""
    return max(1, round((budget_tokens - n_ctx) * width / (positions + width)))


@register_prompt_learner("dept")
class DePTPromptLearner(CoOpPromptLearner):
    """DePT (see the module docstring).

    Args:
        n_ctx: soft-prompt tokens (8 by default: half of CoOp's 16).
        ctx_init: words to initialise the soft prompt from; random when None.
        rank: rank of the low-rank update (default: :func:`matching_rank` for a 16-token budget).
        alpha: the update's scale is ``alpha / sqrt(rank)`` (8 as in the reference code).
        lowrank_lr: learning rate of ``A`` and ``B`` (None: the optimiser's, as for the prompt).
        init_std: std of the soft prompt's random initialisation.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 8,
        ctx_init: str | None = None,
        rank: int | None = None,
        alpha: float = 8.0,
        lowrank_lr: float | None = None,
        init_std: float = 0.02,
    ) -> None:
        backbone.require_text()
        positions = backbone.context_length - n_ctx
        rank = rank if rank is not None else matching_rank(n_ctx, positions, backbone.text_width)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        if self.n_ctx != n_ctx:  # ctx_init had fewer tokens
            positions = backbone.context_length - self.n_ctx
        self.rank, self.lowrank_lr = rank, lowrank_lr
        self.scale = alpha / math.sqrt(rank) * _embedding_rms(backbone)
        self.lora_A = nn.Parameter(torch.empty(positions, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(rank, backbone.text_width))

    def _build_class_buffers(self, classnames: list[str]) -> None:
        super()._build_class_buffers(classnames)
        frozen = self.ctx_index < 0
        # Position of each frozen token among its prompt's frozen tokens (-1 on context tokens).
        position = torch.where(frozen, frozen.long().cumsum(-1) - 1, torch.full_like(self.ctx_index, -1))
        self.register_buffer("frozen_position", position, persistent=False)

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        prompts = super().assemble(ctx)
        position = self.frozen_position
        rows = int(position.max()) + 1  # causal towers: the prompts stop at the longest end token
        update = (self.lora_A[:rows] @ self.lora_B) * self.scale
        delta = update[position.clamp(min=0)] * (position >= 0)[..., None]
        return prompts + delta.to(prompts.dtype)

    def optimizer_groups(self, params: list[nn.Parameter]) -> list[Any]:
        """The low-rank factors in a group of their own at ``lowrank_lr`` (when set)."""
        if self.lowrank_lr is None:
            return params
        lowrank = {id(self.lora_A), id(self.lora_B)}
        return [{"params": [p for p in params if id(p) not in lowrank]},
                {"params": [p for p in params if id(p) in lowrank], "lr": self.lowrank_lr}]
