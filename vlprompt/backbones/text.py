"""Text towers split into the pieces prompting needs (the text-side twin of :class:`ViTTower`).

A :class:`TextTower` adapter says how one library's text transformer embeds tokens, where its
positions come from, which blocks it runs with which attention mask, how it pools and projects,
and whether it is causal. Everything above the adapters (exact truncation after the last pooled
token, chunking, shared-prefix encoding, compilation) is written once, in
:class:`~vlprompt.backbones.Backbone`; the adapters live with their family (open_clip's in
``open_clip.py``, Hugging Face CLIP's in ``hf_clip.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import nn

from vlprompt.backbones.vision import run_block_maybe_checkpointed

__all__ = [
    "TRUNCATABLE_POOLS",
    "TextTower",
    "check_deep_prompt_depth",
    "run_deep_text_prompts",
    "splice_prompt",
]

#: Pooling at the end-of-text token: on a causal tower nothing after it changes the feature.
TRUNCATABLE_POOLS = ("argmax", "eos")


class TextTower(ABC):
    """A text transformer behind the pieces prompting needs: ``tokenize``, ``token_embedding``,
    ``positions``, ``blocks`` run by ``run_block`` under ``mask``, the final ``norm``, ``project``.

    Attributes read from the model by the adapter: ``width`` (token-embedding width),
    ``context_length``, ``embed_dim`` (projected width), ``pool_type``
    (``argmax``/``eos``/``last``/``first``/...), ``eos_id`` (for ``eos``), ``causal``, and
    ``prefix_cache`` (the blocks can run a shared prefix once, :mod:`vlprompt.backbones.prefix`).
    :meth:`encode` is the plain block loop; an adapter whose library must run the tower itself
    (transformers encoders with their own position ids) overrides it.
    """

    width: int
    context_length: int
    embed_dim: int
    pool_type: str
    eos_id: int | None = None
    causal: bool
    prefix_cache: bool = False

    # -- pieces -------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]``."""

    @abstractmethod
    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[N, L, width]`` (before positions)."""

    @property
    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype the blocks compute in."""

    @property
    def grad_checkpointing(self) -> bool:
        """Whether blocks recompute their activations in the backward pass."""
        return False

    @property
    def appended_token(self) -> torch.Tensor | None:
        """A learned token appended after the text and pooled (CoCa's class token), or None."""
        return None

    def positions(self, length: int) -> torch.Tensor:
        """Positional embeddings ``[length, width]`` added to the first ``length`` tokens."""
        raise NotImplementedError(f"{type(self).__name__} adds no positional embeddings")

    def causal_mask(self) -> torch.Tensor:
        """The additive causal mask ``[context_length, context_length]`` (shared-prefix path)."""
        raise NotImplementedError(f"{type(self).__name__} is not causal")

    def mask(self, token_ids: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The attention mask for a sequence of ``length`` tokens (``token_ids`` cut to the text's
        length), or None."""
        return None

    def run_block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One block on batch-first ``x``."""
        return block(x, mask)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final layer norm."""
        return x

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features into the joint space."""
        return pooled

    # -- the plain path -------------------------------------------------------------------------
    def embed(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The blocks' input: ``embeddings`` in the tower's dtype, the appended token if any, and
        positional embeddings."""
        x = embeddings.to(self.dtype)
        token = self.appended_token
        if token is not None:
            x = torch.cat([x, token.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        return x + self.positions(x.shape[1]).to(self.dtype)

    def pool(self, x: torch.Tensor, pooled_at: torch.Tensor) -> torch.Tensor:
        """The normed feature at ``pooled_at`` (at the appended token when there is one)."""
        if self.appended_token is not None:
            return self.norm(x[:, -1])
        return self.pick_pooled(self.norm(x), pooled_at)

    def pick_pooled(self, normed: torch.Tensor, pooled_at: torch.Tensor) -> torch.Tensor:
        """The pooled feature among already normed ones (the norm works per token)."""
        if self.appended_token is not None:
            return normed[:, -1]
        return normed[torch.arange(normed.shape[0], device=normed.device), pooled_at]

    def encode(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        pooled_at: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
        checkpoint_blocks: bool = True,
    ) -> torch.Tensor:
        """Features ``[N, embed_dim]`` of prompts given as embeddings (already cut to the length
        that matters), pooled at ``pooled_at``; deep prompts as in :func:`run_deep_text_prompts`.
        With ``checkpoint_blocks`` each block recomputes its activations in the backward pass when
        the tower's ``grad_checkpointing`` is on."""
        x = self.hidden_states(embeddings, token_ids, deep_prompts, prompt_start, checkpoint_blocks)
        return self.project(self.pool(x, pooled_at))

    def hidden_states(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
        checkpoint_blocks: bool = True,
    ) -> torch.Tensor:
        """The last block's output ``[N, L, width]`` (before the final norm) for prompts given as
        embeddings; the block loop of :meth:`encode`."""
        x = self.embed(embeddings)
        mask = self.mask(token_ids, x.shape[1], x.dtype)

        def run(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
            if checkpoint_blocks:
                return run_block_maybe_checkpointed(self, self.run_block, block, h, mask)
            return self.run_block(block, h, mask)

        return run_deep_text_prompts(self.blocks, x, run, deep_prompts, prompt_start)

    def encode_tokens(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        pooled_at: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token features ``[N, L, width]`` (after the final norm, not projected; the word
        features CRIS's decoder attends) and the pooled projected features ``[N, embed_dim]`` of
        the same pass (what :meth:`encode` returns)."""
        normed = self.norm(self.hidden_states(embeddings, token_ids, deep_prompts, prompt_start))
        return normed[:, : embeddings.shape[1]], self.project(self.pick_pooled(normed, pooled_at))


def check_deep_prompt_depth(n_prompts: int, n_layers: int) -> None:
    """Deep text prompts replace the prompt tokens before layers ``1..n_prompts``: raise a clear
    error when the tower has too few layers for that."""
    if n_prompts >= n_layers:
        raise ValueError(
            f"{n_prompts} deep prompt layers given but the text tower has only "
            f"{n_layers} layers (deep prompts apply to layers 1..{n_layers - 1})."
        )


def splice_prompt(x: torch.Tensor, prompt: torch.Tensor, start: int) -> torch.Tensor:
    """``x`` (``[N, L, D]``) with its ``n`` tokens from ``start`` replaced by ``prompt``
    (``[n, D]``, shared, or ``[N, n, D]``)."""
    prompt = prompt.to(x.dtype)
    if prompt.dim() == 2:
        prompt = prompt.expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], prompt, x[:, start + prompt.shape[1]:]], dim=1)


def run_deep_text_prompts(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    deep_prompts: Sequence[torch.Tensor] | None,
    prompt_start: int,
) -> torch.Tensor:
    """Run a text tower's ``blocks`` over ``x`` (``[N, L, D]``) with ``run(block, x)``; before block
    ``i`` (``1 <= i <= len(deep_prompts)``) the ``n`` tokens from ``prompt_start`` are replaced by
    ``deep_prompts[i - 1]`` (``[n, D]`` or ``[N, n, D]``): MaPLe/IVLP deep text prompting."""
    deep_prompts = list(deep_prompts or [])
    check_deep_prompt_depth(len(deep_prompts), len(blocks))
    for i, block in enumerate(blocks):
        if 1 <= i <= len(deep_prompts):
            x = splice_prompt(x, deep_prompts[i - 1], prompt_start)
        x = run(block, x)
    return x
