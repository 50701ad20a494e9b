"""The small encoder API that prompt learners program against.

Prompt learners never reach into encoder internals: they tokenize, look up token embeddings,
and ask the backbone to encode text *from embeddings* (optionally with per-layer prompts) and
images. Everything model-specific (layouts, pooling, causal masks) lives behind this API.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vlprompt.backbones.vision import PromptPlacement

__all__ = [
    "Backbone",
    "BackboneMismatchError",
    "check_backbone_identity",
    "check_deep_prompt_depth",
    "run_deep_text_prompts",
    "splice_prompt",
]


class BackboneMismatchError(ValueError):
    """A saved prompt was learned on a different encoder than the one it is loaded into."""


class Backbone(nn.Module, ABC):
    """A frozen vision-language encoder (CLIP family) in eval mode.

    Subclasses set these attributes, read from the wrapped model, never hard-coded:
    ``text_width`` (token-embedding width), ``vision_width``, ``embed_dim`` (joint space),
    ``context_length``, ``text_layers``, ``pool_type`` (``argmax``/``eos``/``last``/``first``)
    and ``is_causal``; ``vision_layers`` when the image tower can take visual prompts.
    Vision-only backbones set ``has_text = False``.
    """

    #: False for vision-only encoders (timm): methods then need a learned classification head.
    has_text: bool = True
    #: Encode at most this many prompts at a time in ``encode_text_embeddings`` (None: all at once).
    #: A memory setting only, never part of ``identity``; backbones that do not chunk leave it None.
    text_chunk_size: int | None = None

    text_width: int
    vision_width: int
    embed_dim: int
    context_length: int
    text_layers: int
    vision_layers: int | None = None
    pool_type: str
    is_causal: bool

    # -- frozen by construction ------------------------------------------------------------
    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:  # noqa: D102 - documented on the class
        # A frozen encoder stays in eval mode (no dropout, fixed norms) even when the
        # LightningModule that holds it is switched to training.
        return super().train(False)

    # -- text --------------------------------------------------------------------------------
    def require_text(self) -> None:
        """Raise a clear error when this backbone has no text tower (prompt learners that need
        class text call this first)."""
        if not self.has_text:
            raise NotImplementedError(
                f"{type(self).__name__} {getattr(self, 'model_name', '')!r} is a vision-only backbone: it has "
                "no text tower. Use a method with a learned head (VPT with head='linear'), or an "
                "OpenCLIPBackbone for methods that prompt text."
            )

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` for ``texts``."""

    @abstractmethod
    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input token embeddings ``[N, L, text_width]`` (before positional embeddings)."""

    @abstractmethod
    def pool_indices(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Position of the token whose feature is pooled, for each sequence ``[N]``."""

    @abstractmethod
    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None = None,
        prompt_start: int = 1,
        shared_prefix: int = 0,
        prefix_groups: int = 1,
    ) -> torch.Tensor:
        """Encode prompts given as token embeddings into joint-space features ``[N, embed_dim]``.

        Args:
            embeddings: ``[N, L, text_width]`` input embeddings, e.g. learned context spliced
                into the token embeddings of a tokenized template.
            token_ids: ``[N, L]`` the ids the embeddings stand for; they decide where the text is
                pooled (EOT position) and which tokens are padding.
            deep_prompts: optional per-layer prompts for layers ``1..len(deep_prompts)``; entry
                ``i`` (``[n, text_width]`` or ``[N, n, text_width]``) replaces the ``n`` tokens
                starting at ``prompt_start`` before layer ``i + 1`` (MaPLe/IVLP deep prompting).
            prompt_start: index of the first prompt token (1 = right after start-of-text).
            shared_prefix: the first ``shared_prefix`` positions are the same in every prompt of a
                group, built from the same tensors (a unified context after the start token):
                a backbone may encode them once per group (exact on causal towers). Gradients
                then reach them through the group's first prompt only, which sums to the same
                gradient for the tensors they were built from. 0: nothing is shared.
            prefix_groups: the prompts are this many consecutive groups of equal size, each with
                its own shared prefix (CoCoOp: one group per image).
        """

    @property
    def text_start(self) -> int:
        """Index of the first text token (1 after CLIP's start-of-text token, 0 for tokenizers
        without one): where the tokens of the empty text and of a one-word text first differ.
        Read from the tokenizer, never from the pooling (a tower may pool at the last position)."""
        empty, word = self.tokenize(["", "x"])
        return int((empty != word).nonzero()[0])

    def text_token_count(self, text: str) -> int:
        """How many tokens ``text`` takes, special tokens not counted."""
        return int(self.text_token_counts(self.tokenize([text]))[0])

    def text_token_counts(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Tokens of text (special tokens not counted) in each tokenized sequence ``[N]``; a text
        the tokenizer had to cut counts as filling the whole context."""
        if self.pool_type in ("argmax", "eos"):  # pooled at the end-of-text token, right after the text
            return self.pool_indices(token_ids) - self.text_start
        empty = self.tokenize([""])[0].to(token_ids.device)
        pad = empty[-1]  # the empty text is padding after its special tokens
        return (token_ids != pad).sum(-1) - (empty != pad).sum()

    def text_length_needed(self, token_ids: torch.Tensor) -> int:
        """How many leading positions of ``token_ids`` the pooled text features depend on;
        causal towers override this to allow exact truncation."""
        return token_ids.shape[1]

    def encode_text(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Encode plain text (strings or token ids) into ``[N, embed_dim]`` features."""
        token_ids = self.tokenize(texts) if not isinstance(texts, torch.Tensor) else texts
        token_ids = token_ids.to(self.device)
        return self.encode_text_embeddings(self.token_embedding(token_ids), token_ids)

    # -- images ------------------------------------------------------------------------------
    @abstractmethod
    def encode_image(
        self,
        images: torch.Tensor,
        visual_prompts: Sequence[torch.Tensor] | None = None,
        placement: PromptPlacement = "after_cls",
    ) -> torch.Tensor:
        """Encode preprocessed images ``[B, 3, H, W]`` into ``[B, embed_dim]`` features.

        Args:
            images: preprocessed images.
            visual_prompts: optional prompt tokens for a ViT image tower (VPT). Entry 0
                (``[n, vision_width]`` or ``[B, n, vision_width]``) is inserted after the patch
                embeddings; entry ``i >= 1`` replaces those tokens before layer ``i`` (deep
                prompts). They are removed before the tower's own pooling.
            placement: ``after_cls`` (VPT) or ``after_patches`` (MaPLe).
        """

    def encode_image_layers(
        self,
        images: torch.Tensor,
        layers: Sequence[int],
        visual_prompts: Sequence[torch.Tensor] | None = None,
        placement: PromptPlacement = "after_cls",
    ) -> list[torch.Tensor]:
        """Token sequences ``[B, prefix + patches, vision_width]`` of the image tower after blocks
        ``layers`` (0-based), with optional visual prompts (as in :meth:`encode_image`) removed
        from them; blocks after the deepest one asked for are not run. For segmentation decoders
        that read intermediate layers (CLIPSeg). ``vision_prefix_tokens`` and ``patch_size`` say
        how to turn the sequence into a grid."""
        tower = getattr(self, "_vision", None)
        if tower is None:
            raise NotImplementedError(getattr(self, "_vision_error", f"{type(self).__name__} has no ViT image tower"))
        if visual_prompts:
            self.check_visual_prompts(len(visual_prompts))
        return tower.encode_layers(images, layers, list(visual_prompts or ()), placement)

    @property
    def vision_prefix_tokens(self) -> int:
        """Tokens before the patches in the image tower's sequence (class and register tokens)."""
        return self._vision.num_prefix_tokens

    @property
    def patch_size(self) -> tuple[int, int]:
        """Pixels per patch of the image tower, (height, width)."""
        return self._vision.patch_size

    def check_visual_prompts(self, depth: int = 1) -> None:
        """Raise a clear error unless the image tower takes ``depth`` layers of visual prompts."""
        if self.vision_layers is None:
            raise NotImplementedError(f"{type(self).__name__} cannot take visual prompts")
        if not 1 <= depth <= self.vision_layers:
            raise ValueError(
                f"visual prompt depth must be between 1 and the image tower's {self.vision_layers} "
                f"layers, got {depth}"
            )

    # -- scoring -----------------------------------------------------------------------------
    @property
    @abstractmethod
    def logit_scale(self) -> torch.Tensor:
        """Temperature the encoder was trained with (already exponentiated)."""

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """Additive logit bias (SigLIP), or None."""
        return None

    # -- identity and preprocessing ------------------------------------------------------------
    @property
    @abstractmethod
    def preprocess_cfg(self) -> dict[str, Any]:
        """Image preprocessing the encoder expects: ``size``, ``mean``, ``std``, ``interpolation``,
        ``resize_mode``."""

    @property
    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What a saved prompt records to recognise this encoder again: name, weights source,
        widths, and a fingerprint of the weights."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @staticmethod
    def fingerprint(tensors: Sequence[torch.Tensor]) -> str:
        """Short content hash of a few weight tensors, to tell two checkpoints apart."""
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def check_backbone_identity(saved: dict[str, Any], current: dict[str, Any], what: str = "prompt") -> None:
    """Raise :class:`BackboneMismatchError` with a readable message when ``saved`` (from a saved
    prompt's ``config.json``) does not describe the same encoder as ``current``."""
    shape_keys = ("text_width", "vision_width", "embed_dim", "context_length", "text_layers", "vision_layers")
    diffs = [
        f"{k}: saved {saved.get(k)!r}, current {current.get(k)!r}"
        for k in shape_keys
        if k in saved and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise BackboneMismatchError(
            f"This {what} was learned on backbone {saved.get('name')!r} "
            f"(pretrained={saved.get('pretrained')!r}) but is being loaded into "
            f"{current.get('name')!r} (pretrained={current.get('pretrained')!r}); "
            f"their shapes differ ({'; '.join(diffs)}). Load it with the backbone it was trained on."
        )
    if saved.get("fingerprint") and saved.get("fingerprint") != current.get("fingerprint"):
        raise BackboneMismatchError(
            f"This {what} was learned on {saved.get('name')!r} with weights "
            f"{saved.get('pretrained')!r} (fingerprint {saved.get('fingerprint')}), but the current "
            f"backbone {current.get('name')!r} with weights {current.get('pretrained')!r} has "
            f"different weights (fingerprint {current.get('fingerprint')}). Prompts do not transfer "
            f"between checkpoints; pass strict=False to load it anyway."
        )


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
