"""CoOp: learned context vectors in place of a hand-written prompt."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.data.classnames import with_full_stop
from vlprompt.prompts.base import PromptLearner, register_prompt_learner

__all__ = ["CoOpPromptLearner", "load_dassl_state_dict"]

log = logging.getLogger(__name__)

ClassTokenPosition = Literal["end", "middle", "front"]
_PLACEHOLDER = "X"


@register_prompt_learner("coop")
class CoOpPromptLearner(PromptLearner):
    """Context Optimization (Zhou et al., IJCV 2022, "Learning to Prompt for Vision-Language
    Models").

    The prompt for class ``c`` is ``[SOS] ctx_1 ... ctx_M <name of c> . [EOS]`` where the context
    vectors are learned in the token-embedding space.

    Args:
        n_ctx: number of context tokens. With ``ctx_init``, at most its token count: fewer
            learns only the first ``n_ctx`` tokens and keeps the remaining words fixed before the
            class name (MaPLe's ``n_ctx=2``: learned "a photo", fixed "of a").
        ctx_init: words to initialise the context from, e.g. ``"a photo of a"``; random
            (normal, std ``init_std``) when None.
        class_token_position: where the class name goes relative to the context:
            ``end`` (default), ``middle`` or ``front``.
        class_specific_ctx: one context per class (CSC) instead of one shared (unified) context.
        init_std: std of the random initialisation.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_token_position: ClassTokenPosition = "end",
        class_specific_ctx: bool = False,
        init_std: float = 0.02,
    ) -> None:
        backbone.require_text()
        if class_token_position not in ("end", "middle", "front"):
            raise ValueError(f"class_token_position must be end, middle or front, not {class_token_position!r}")
        init_vectors, fixed_words = None, ""
        if ctx_init:
            ctx_init = ctx_init.strip().replace("_", " ")
            init_vectors = _word_embeddings(backbone, ctx_init)
            if n_ctx > init_vectors.shape[0]:
                log.info("ctx_init %r has %d tokens; using n_ctx=%d", ctx_init, len(init_vectors), len(init_vectors))
            elif n_ctx < init_vectors.shape[0]:
                if class_token_position != "end":
                    raise ValueError("learning only part of ctx_init needs class_token_position='end'")
                fixed_words = _words_after_tokens(backbone, ctx_init, n_ctx)
                init_vectors = init_vectors[:n_ctx]
            n_ctx = init_vectors.shape[0]
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        super().__init__(backbone, classnames)
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.class_token_position = class_token_position
        self.class_specific_ctx = class_specific_ctx
        self._init_vectors = init_vectors
        self._fixed_words = fixed_words
        self._init_std = init_std
        if not class_specific_ctx:
            self.ctx = nn.Parameter(self._initial_ctx(()))
        self.set_classnames(classnames)

    def _initial_ctx(self, lead: tuple[int, ...]) -> torch.Tensor:
        if self._init_vectors is not None:
            return self._init_vectors.expand(*lead, -1, -1).clone()
        ctx = torch.empty(*lead, self.n_ctx, self.backbone.text_width)
        return nn.init.normal_(ctx, std=self._init_std)

    # -- prompt layout -----------------------------------------------------------------------
    def _prompt_text(self, name: str) -> tuple[str, list[tuple[int, int]]]:
        """The template text for ``name`` with placeholders where the context goes, and the
        ``(offset within the text tokens, length)`` of each run of context tokens."""
        x = _PLACEHOLDER
        n, half = self.n_ctx, self.n_ctx // 2
        name_len = self.backbone.text_token_count(name)
        if self.class_token_position == "end":
            fixed = [self._fixed_words] if self._fixed_words else []
            return with_full_stop(" ".join([x] * n + fixed + [name])), [(0, n)]
        if self.class_token_position == "front":
            return " ".join([name] + [x] * n) + ".", [(name_len, n)]
        return " ".join([x] * half + [name] + [x] * (n - half)) + ".", [(0, half), (half + name_len, n - half)]

    def _build_class_buffers(self, classnames: list[str]) -> None:
        if self.class_specific_ctx:
            if not hasattr(self, "ctx") or self.ctx.shape[0] != len(classnames):
                if hasattr(self, "ctx"):
                    raise ValueError(
                        "class-specific contexts are tied to their classes; cannot switch from "
                        f"{self.ctx.shape[0]} to {len(classnames)} classes"
                    )
                self.ctx = nn.Parameter(self._initial_ctx((len(classnames),)))
        texts, layouts = zip(*(self._prompt_text(c) for c in classnames))
        token_ids = self.backbone.tokenize(texts)
        counts = self.backbone.text_token_counts(token_ids)
        empty = self.backbone.tokenize([""])[0]
        specials = int((empty != empty[-1]).sum())  # start/end tokens around the text
        if (counts >= token_ids.shape[1] - specials).any():  # filling the context: it may have been cut
            worst = classnames[int(counts.argmax())]
            raise ValueError(
                f"the prompt for class {worst!r} with {self.n_ctx} context tokens does not fit the "
                f"text encoder's context length ({token_ids.shape[1]}); use fewer context tokens "
                "or a shorter class name"
            )
        length = self.backbone.text_length_needed(token_ids)
        token_ids = token_ids[:, :length]
        offset = self.backbone.text_start
        ctx_index = torch.full(token_ids.shape, -1, dtype=torch.long)
        for c, runs in enumerate(layouts):
            k = 0
            for start, run in runs:
                ctx_index[c, offset + start : offset + start + run] = torch.arange(k, k + run)
                k += run
        # Leading positions alike in every prompt (start token, a unified context and any fixed
        # words before the class name): a causal backbone encodes them once.
        alike = ((token_ids == token_ids[:1]) & (ctx_index == ctx_index[:1])).all(0)
        self._shared_prefix = int(alike.long().cumprod(0).sum())
        placeholder = self.backbone.tokenize([_PLACEHOLDER])[0, offset]
        if not (token_ids[ctx_index >= 0] == placeholder).all():
            raise RuntimeError("context placeholders landed on unexpected tokens; tokenizer not supported")
        with torch.no_grad():
            fixed = self.backbone.token_embedding(token_ids).detach()
        device = self.ctx.device
        self.register_buffer("token_ids", token_ids.to(device), persistent=False)
        self.register_buffer("ctx_index", ctx_index.to(device), persistent=False)
        self.register_buffer("fixed_embeddings", fixed.to(device), persistent=False)

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """Splice context vectors into the fixed token embeddings.

        ``ctx`` is ``[n_ctx, D]`` (unified), ``[C, n_ctx, D]`` (class-specific) or
        ``[B, 1 or C, n_ctx, D]`` (per image); the result is ``[..., C, L, D]``.
        """
        fixed, index = self.fixed_embeddings, self.ctx_index
        num_classes, length, width = fixed.shape
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0)
        lead = ctx.shape[:-3]
        ctx = ctx.expand(*lead, num_classes, -1, -1)
        gather_index = index.clamp(min=0)[..., None].expand(*lead, num_classes, length, width)
        gathered = torch.gather(ctx, -2, gather_index)
        return torch.where((index >= 0)[..., None], gathered.to(fixed.dtype), fixed)

    def encode_prompts(
        self, ctx: torch.Tensor, deep_prompts: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Text features ``[..., C, D]`` for the given context (see :meth:`assemble`); optional
        ``deep_prompts`` (``[n_ctx, D]`` each) replace the context tokens before text layers
        ``1, 2, ...`` (IVLP/MaPLe deep prompting; needs ``class_token_position='end'``)."""
        if deep_prompts and self.class_token_position != "end":
            raise ValueError("deep text prompts need class_token_position='end'")
        prompts = self.assemble(ctx)
        lead = prompts.shape[:-3]
        flat = prompts.reshape(-1, *prompts.shape[-2:])
        token_ids = self.token_ids.repeat(flat.shape[0] // self.token_ids.shape[0], 1)
        # One context for all classes (per image for CoCoOp): the prompts of a group share a prefix.
        unified = ctx.dim() == 2 or ctx.shape[-3] == 1
        features = self.backbone.encode_text_embeddings(
            flat, token_ids, deep_prompts=deep_prompts, prompt_start=self.backbone.text_start,
            shared_prefix=self._shared_prefix if unified else 0, prefix_groups=flat.shape[0] // self.num_classes,
        )
        return features.reshape(*lead, self.num_classes, -1)

    def deep_text_prompts(self) -> list[torch.Tensor]:
        """Context tokens for text layers 1, 2, ... (none for CoOp; deep-prompting methods
        override this)."""
        return []

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_prompts(self.ctx, self.deep_text_prompts())

    # -- interoperability --------------------------------------------------------------------
    def load_dassl_checkpoint(self, path: str | Path) -> None:
        """Load ``ctx`` from a checkpoint saved by the CoOp/Dassl reference code
        (``prompt_learner/model.pth.tar-N``)."""
        others = sorted(set(self.state_dict()) - {"ctx"})
        if others:
            raise ValueError(
                f"a CoOp checkpoint holds only the context, but this {self.name} prompt also learns "
                f"{others}; it would start half-initialised. Start from a saved vlprompt prompt instead."
            )
        self._copy_ctx(load_dassl_state_dict(path), path)

    def _copy_ctx(self, state: dict[str, torch.Tensor], source: str | Path) -> None:
        if "ctx" not in state:
            raise KeyError(f"{source}: no 'ctx' tensor in the checkpoint (keys: {sorted(state)[:10]})")
        ctx = state["ctx"]
        if ctx.shape != self.ctx.shape:
            raise ValueError(
                f"{source}: context shape {tuple(ctx.shape)} does not match this prompt's "
                f"{tuple(self.ctx.shape)} (n_ctx, class-specific and text width must agree)"
            )
        with torch.no_grad():
            self.ctx.copy_(ctx.to(self.ctx))


def load_dassl_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a Dassl checkpoint without unpickling arbitrary objects."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{path}: not a readable Dassl/CoOp checkpoint ({err})") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict', got {type(checkpoint).__name__}")
    return {k.removeprefix("prompt_learner."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _words_after_tokens(backbone: Backbone, words: str, n_tokens: int) -> str:
    """The words of ``words`` left after its first ``n_tokens`` tokens (which must end a word)."""
    split = words.split()
    for k in range(len(split) + 1):
        covered = backbone.text_token_count(" ".join(split[:k])) if k else 0
        if covered == n_tokens:
            return " ".join(split[k:])
        if covered > n_tokens:
            break
    raise ValueError(f"n_ctx={n_tokens} splits a word of ctx_init {words!r}; choose n_ctx at a word boundary")


def _word_embeddings(backbone: Backbone, words: str) -> torch.Tensor:
    ids = backbone.tokenize([words])
    n = backbone.text_token_count(words)
    start = backbone.text_start
    with torch.no_grad():
        return backbone.token_embedding(ids)[0, start : start + n].detach().float().clone()
