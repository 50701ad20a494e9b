"""The small encoder API that prompt learners program against.

Prompt learners never reach into encoder internals: they tokenize, look up token embeddings,
and ask the backbone to encode text *from embeddings* (optionally with per-layer prompts) and
images. Everything model-specific (layouts, pooling, causal masks) lives behind this API.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlprompt.backbones.prefix import encode_prefix, encode_suffix
from vlprompt.backbones.resnet import ImageMaps
from vlprompt.backbones.text import (
    TRUNCATABLE_POOLS,
    TextTower,
    check_deep_prompt_depth,
    run_deep_text_prompts,
    splice_prompt,
)
from vlprompt.backbones.vision import PromptPlacement

__all__ = [
    "Backbone",
    "BackboneMismatchError",
    "TextTokens",
    "check_backbone_identity",
    "check_deep_prompt_depth",
    "run_deep_text_prompts",
    "splice_prompt",
]


#: Pool types that read the feature of one token (``pool_indices``).
_TOKEN_POOLS = ("argmax", "eos", "first", "last")


class TextTokens(NamedTuple):
    """Per-token text features of prompts (CRIS's word features), from the same pass as their
    pooled features."""

    #: after the text tower's final norm, not projected ``[N, L, text_width]``
    words: torch.Tensor
    #: True where a position is padding (after the pooled end-of-text token) ``[N, L]``
    padding: torch.Tensor
    #: the pooled, projected features ``[N, embed_dim]`` (what ``encode_text_embeddings`` returns)
    state: torch.Tensor


class BackboneMismatchError(ValueError):
    """A saved prompt was learned on a different encoder than the one it is loaded into."""


class Backbone(nn.Module, ABC):
    """A frozen vision-language encoder (CLIP family) in eval mode.

    Subclasses set ``text_tower`` (a :class:`~vlprompt.backbones.text.TextTower` adapter, or None
    for vision-only encoders) and these attributes, read from the wrapped model, never
    hard-coded: ``vision_width``, ``embed_dim`` (joint space) and ``vision_layers`` when the image
    tower can take visual prompts; :meth:`_set_text_tower` reads ``text_width``,
    ``context_length``, ``text_layers``, ``pool_type`` (``argmax``/``eos``/``last``/``first``)
    and ``is_causal`` from the text tower.

    The text path above the adapters is written once, here: exact truncation after the last
    pooled token on causal towers (``truncate_text``), chunks of ``text_chunk_size`` prompts,
    shared-prefix encoding (``share_prefix``, :mod:`vlprompt.backbones.prefix`) and compiled
    towers (``compile_towers``).
    """

    #: The text tower's adapter; None for vision-only encoders (timm).
    text_tower: TextTower | None = None
    #: Encode at most this many prompts at a time in ``encode_text_embeddings`` (None: all at once).
    #: A memory setting only, never part of ``identity``.
    text_chunk_size: int | None = None
    #: Encode text only up to the longest pooled position when that is exact (causal towers).
    truncate_text: bool = True
    #: Encode a prefix shared by every prompt once when that is exact (causal towers).
    share_prefix: bool = True
    #: Recompute activations in the backward pass (whole text chunks when chunking).
    grad_checkpointing: bool = False

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
    @property
    def has_text(self) -> bool:
        """False for vision-only encoders (timm): methods then need a learned classification head."""
        return self.text_tower is not None

    def _set_text_tower(self, tower: TextTower) -> None:
        """Use ``tower`` for text and read the text attributes from it."""
        self.text_tower = tower
        self.text_width, self.context_length = tower.width, tower.context_length
        self.text_layers, self.pool_type, self.is_causal = len(tower.blocks), tower.pool_type, tower.causal

    def _check_text_settings(self) -> None:
        if self.text_chunk_size is not None and self.text_chunk_size < 1:
            raise ValueError(f"text_chunk_size must be a positive number of prompts or None, got {self.text_chunk_size}")

    def require_text(self) -> TextTower:
        """The text tower; a clear error when this backbone has none (prompt learners that need
        class text call this first)."""
        if self.text_tower is None:
            raise NotImplementedError(
                f"{type(self).__name__} {getattr(self, 'model_name', '')!r} is a vision-only backbone: it has "
                "no text tower. Use a method with a learned head (VPT with head='linear'), or an "
                "OpenCLIPBackbone for methods that prompt text."
            )
        return self.text_tower

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` for ``texts``."""
        return self.require_text().tokenize(texts)

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input token embeddings ``[N, L, text_width]`` (before positional embeddings)."""
        return self.require_text().token_embedding(token_ids.to(self.device))

    def pool_indices(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Position of the token whose feature is pooled, for each sequence ``[N]``."""
        tower = self.require_text()
        n, length = token_ids.shape
        if self.pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (token_ids == tower.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(n, dtype=torch.long, device=token_ids.device)
        if self.pool_type == "last":
            return torch.full((n,), length - 1, dtype=torch.long, device=token_ids.device)
        raise NotImplementedError(f"text pool type {self.pool_type!r} gives no single pooled feature")

    @property
    def can_truncate_text(self) -> bool:
        """Whether pooled text features are exactly unchanged by dropping tokens after EOT."""
        return self.has_text and self.is_causal and self.pool_type in TRUNCATABLE_POOLS

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
        self.require_text()
        token_ids = token_ids.to(embeddings.device)
        if self._token_capture is not None:
            return self._encode_text_tokens(embeddings, token_ids, deep_prompts, prompt_start)
        if self._can_share_prefix(embeddings, token_ids, deep_prompts, prompt_start, shared_prefix, prefix_groups):
            return self._encode_shared_prefix(
                embeddings, token_ids, list(deep_prompts or []), prompt_start, shared_prefix, prefix_groups
            )
        n, size = embeddings.shape[0], self.text_chunk_size
        if size is None or n <= size:
            return self._encode_text_chunk(embeddings, token_ids, deep_prompts, prompt_start)
        deep_prompts = list(deep_prompts or [])
        # Checkpoint whole chunks: autograd keeps only each chunk's inputs, and the backward pass
        # recomputes one chunk at a time (its blocks then run plainly, not checkpointed again).
        recompute = (
            self.grad_checkpointing
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in [embeddings, *deep_prompts])
        )
        features = []
        for start in range(0, n, size):
            rows = slice(start, start + size)
            chunk_prompts = [p[rows] if p.dim() == 3 else p for p in deep_prompts]  # [N, n, D] per prompt
            args = (embeddings[rows], token_ids[rows], chunk_prompts, prompt_start)
            if recompute:
                features.append(checkpoint(self._encode_text_chunk, *args, checkpoint_blocks=False, use_reentrant=False))
            else:
                features.append(self._encode_text_chunk(*args))
        return torch.cat(features)

    #: While :meth:`capture_text_tokens` is active: the per-token features of every text encoded.
    _token_capture: list[TextTokens] | None = None

    @contextmanager
    def capture_text_tokens(self) -> Iterator[list[TextTokens]]:
        """Within this context every :meth:`encode_text_embeddings` call also records its prompts'
        per-token features (:class:`TextTokens`, appended to the yielded list) and returns the same
        pooled features as always. Prompt learners stay unchanged: a segmentation head that
        attends words (CRIS) asks the learner for its text features inside this context. The
        plain path is taken (no shared prefix, no chunking); texts are still cut after the
        longest pooled token on causal towers, which changes no word feature up to it."""
        if self._token_capture is not None:
            raise RuntimeError("capture_text_tokens is already active on this backbone")
        self._token_capture = captured = []
        try:
            yield captured
        finally:
            self._token_capture = None

    def _encode_text_tokens(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
    ) -> torch.Tensor:
        """Encode and record per-token features for :meth:`capture_text_tokens`."""
        pooled_at = self.pool_indices(token_ids)
        length = min(self.text_length_needed(token_ids), embeddings.shape[1])
        words, state = self.text_tower.encode_tokens(embeddings[:, :length], token_ids[:, :length], pooled_at,
                                                     deep_prompts, prompt_start)
        positions = torch.arange(words.shape[1], device=words.device)
        if self.pool_type in ("argmax", "eos"):
            padding = positions[None] > pooled_at[:, None]
        else:  # pooled at a fixed position: no end-of-text to tell padding by
            padding = torch.zeros(words.shape[:2], dtype=torch.bool, device=words.device)
        self._token_capture.append(TextTokens(words, padding, state))
        return state

    def _encode_text_chunk(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
        checkpoint_blocks: bool = True,
    ) -> torch.Tensor:
        """The plain path for one chunk: cut to the length the pooled features need, then the
        tower's block loop."""
        pooled_at = self.pool_indices(token_ids) if self.pool_type in _TOKEN_POOLS else None
        # Causal attention: the feature at position p only sees tokens <= p, so everything after
        # the last pooled position is dead weight. Dropping it is exact (text_length_needed).
        length = min(self.text_length_needed(token_ids), embeddings.shape[1])
        return self.text_tower.encode(embeddings[:, :length], token_ids[:, :length], pooled_at, deep_prompts,
                                      prompt_start, checkpoint_blocks)

    def _can_share_prefix(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
        shared_prefix: int,
        prefix_groups: int,
    ) -> bool:
        """Whether the shared-prefix path applies: a causal tower of blocks the prefix cache can
        run, deep prompts shared and inside the prefix, every pooled token after it."""
        if prefix_groups < 1 or embeddings.shape[0] % prefix_groups:
            raise ValueError(f"{embeddings.shape[0]} prompts cannot form {prefix_groups} groups of equal size")
        if not (self.share_prefix and shared_prefix >= 2 and self.can_truncate_text):
            return False
        if any(p.dim() != 2 or prompt_start + p.shape[0] > shared_prefix for p in deep_prompts or []):
            return False
        return self.text_tower.prefix_cache and int(self.pool_indices(token_ids).min()) >= shared_prefix

    def _encode_shared_prefix(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: list[torch.Tensor],
        prompt_start: int,
        shared_prefix: int,
        prefix_groups: int,
    ) -> torch.Tensor:
        """Encode each group's prefix once and every suffix against its cached keys/values
        (:mod:`vlprompt.backbones.prefix`); suffixes run in buckets of equal length (at most
        ``text_chunk_size`` each), so no padding is computed."""
        tower = self.text_tower
        blocks = tower.blocks
        check_deep_prompt_depth(len(deep_prompts), len(blocks))
        dtype, causal = tower.dtype, tower.causal_mask()
        position = tower.positions(tower.context_length).to(dtype)
        n, p = embeddings.shape[0], shared_prefix
        group_size = n // prefix_groups
        prefix = embeddings[::group_size, :p].to(dtype) + position[:p]
        compiled = getattr(self, "_compiled", {})
        cache = compiled.get("prefix", encode_prefix)(blocks, prefix, causal, deep_prompts, prompt_start)
        groups = torch.arange(n, device=embeddings.device) // group_size if prefix_groups > 1 else None
        pooled_at = self.pool_indices(token_ids)

        def run(rows: torch.Tensor) -> torch.Tensor:
            end = int(pooled_at[rows].max()) + 1
            x = embeddings[rows, p:end].to(dtype) + position[p:end]
            suffix = compiled.get("suffix", encode_suffix)
            x = suffix(blocks, x, cache, causal, None if groups is None else groups[rows])
            return tower.project(tower.norm(x[torch.arange(len(rows)), pooled_at[rows] - p]))

        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        order = torch.argsort(pooled_at, stable=True)
        buckets = torch.split(order, torch.unique_consecutive(pooled_at[order], return_counts=True)[1].tolist())
        size = self.text_chunk_size or n
        chunks = [chunk for bucket in buckets for chunk in torch.split(bucket, size)]
        features = [checkpoint(run, rows, use_reentrant=False) if recompute else run(rows) for rows in chunks]
        return torch.cat(features)[torch.argsort(torch.cat(chunks))]

    def _compile_towers(self, image_module: nn.Module | None) -> None:
        """``torch.compile`` the towers' blocks in place (parameter names unchanged), the whole
        ``image_module`` (plain ``encode_image``, also non-ViT towers) and the shared-prefix
        functions (kept in ``self._compiled``)."""
        text_blocks = self.text_tower.blocks if self.text_tower is not None else []
        image_blocks = self._vision.blocks if getattr(self, "_vision", None) is not None else []
        for block in [*text_blocks, *image_blocks]:
            block.compile(dynamic=True)
        if image_module is not None:
            image_module.compile(dynamic=True)
        self._compiled = {"prefix": torch.compile(encode_prefix, dynamic=True),
                          "suffix": torch.compile(encode_suffix, dynamic=True)}

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
        """How many leading positions of ``token_ids`` the pooled text features depend on: up to
        the last pooled position on causal towers (exact truncation), else all of them."""
        if self.truncate_text and self.can_truncate_text:
            return int(self.pool_indices(token_ids).max()) + 1
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
        keep_prompts: bool = False,
    ) -> list[torch.Tensor]:
        """Token sequences ``[B, prefix + patches, vision_width]`` of the image tower after blocks
        ``layers`` (0-based), with optional visual prompts (as in :meth:`encode_image`) removed
        from them (``keep_prompts``: left in after the patches, as TuneVLSeg's decoder reads them;
        :meth:`~vlprompt.backbones.vision.ViTTower.encode_layers`); blocks after the deepest one
        asked for are not run. For segmentation decoders that read intermediate layers (CLIPSeg).
        ``vision_prefix_tokens`` and ``patch_size`` say how to turn the sequence into a grid."""
        tower = getattr(self, "_vision", None)
        if tower is None:
            raise NotImplementedError(getattr(self, "_vision_error", f"{type(self).__name__} has no ViT image tower"))
        if visual_prompts:
            self.check_visual_prompts(len(visual_prompts))
        return tower.encode_layers(images, layers, list(visual_prompts or ()), placement, keep_prompts)

    @property
    def has_image_maps(self) -> bool:
        """Whether :meth:`encode_image_maps` works: a convolutional CLIP image tower (ResNet)."""
        return getattr(self, "_resnet", None) is not None

    @property
    def image_map_widths(self) -> tuple[int, int, int, int]:
        """Channels of the four stages' maps of :meth:`encode_image_maps` (the dense pool has
        ``embed_dim``)."""
        if not self.has_image_maps:
            self.encode_image_maps(torch.empty(0))  # raises the clear error
        return self._resnet.stage_widths

    def encode_image_maps(self, images: torch.Tensor) -> ImageMaps:
        """Multi-scale feature maps of a convolutional image tower (CLIP's ModifiedResNet): the four
        stages' outputs and the attention pool run at every position
        (:class:`~vlprompt.backbones.resnet.ImageMaps`), for dense heads such as CRIS. Raises a
        clear error for other towers."""
        tower = getattr(self, "_resnet", None)
        if tower is None:
            raise NotImplementedError(f"{type(self).__name__} {getattr(self, 'model_name', '')!r} has no convolutional "
                                      "CLIP image tower (ModifiedResNet, open_clip RN50-style): no multi-scale maps")
        return tower.encode_maps(images)

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
