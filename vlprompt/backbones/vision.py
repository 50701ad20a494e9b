"""Visual prompts inside ViT image towers (open_clip's own ViT and timm ViTs).

One loop runs the tower block by block so prompt tokens can be inserted after the embeddings
(shallow, VPT) and replaced before later blocks (deep, VPT-deep/MaPLe/IVLP). The prompts are
dropped again after the last block, so the tower's own pooling (class token, average, attention
pooling) sees exactly the token layout it was trained with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["PromptPlacement", "ViTTower", "run_block_maybe_checkpointed", "vit_tower"]

#: Where the input-layer prompt tokens join the image tower's sequence:
#:
#: * ``after_cls``: right after the class (and register) tokens, before the tower's pre-norm
#:   (``ln_pre``), which then normalises them with the patches: VPT's position (Jia et al., whose
#:   ViTs have no pre-norm);
#: * ``after_patches``: appended after the patch tokens, before the pre-norm: the MaPLe
#:   repository's VPT baseline, IVLP and MaPLe;
#: * ``after_cls_after_pre_norm``: right after the class tokens, but joined after the pre-norm,
#:   so the tokens enter the first block as they are: MVLPT's code (``ImageEncoder`` in
#:   ``trainers/mvlpt.py`` runs ``ln_pre`` and then inserts them). The norm is per token, so the
#:   patch and class tokens are the same either way; only the prompt tokens differ.
#:
#: Deep prompts (before blocks ``1..``) replace the tokens in the residual stream in every
#: placement, unnormalised, as all these references do.
PromptPlacement = Literal["after_cls", "after_patches", "after_cls_after_pre_norm"]
PLACEMENTS: tuple[str, ...] = ("after_cls", "after_patches", "after_cls_after_pre_norm")

SUPPORTED_TOWERS = (
    "open_clip VisionTransformer (every open_clip ViT-*)",
    "timm VisionTransformer (timm vit_*, deit_*, also inside open_clip timm towers)",
    "timm Eva (EVA02, PE-Core; rotary position embeddings; timm eva02_*, also inside open_clip)",
)


def run_block_maybe_checkpointed(tower: nn.Module, run: Callable[..., torch.Tensor], *args: torch.Tensor,
                                 **kwargs) -> torch.Tensor:
    """``run(*args, **kwargs)``, through activation checkpointing when the tower's own
    ``grad_checkpointing`` flag is on (open_clip's ``set_grad_checkpointing``, timm's) and autograd
    is recording: activations are recomputed in the backward pass instead of stored, so deep
    prompts fit large towers. Non-reentrant, so gradients reach the prompts although the frozen
    weights need none."""
    if getattr(tower, "grad_checkpointing", False) and torch.is_grad_enabled():
        return checkpoint(run, *args, use_reentrant=False, **kwargs)
    return run(*args, **kwargs)


class ViTTower:
    """A ViT image tower split into the pieces prompting needs.

    ``embed`` gives the token sequence after positional embeddings (before any pre-norm),
    ``pre_norm`` the norm applied before the blocks, ``blocks`` the transformer blocks and
    ``head`` turns the final tokens (prompts removed) into the tower's output features. The
    sequence is ``num_prefix_tokens`` (class and register tokens) then the patches, row by row, of
    ``patch_size`` pixels each.
    """

    def __init__(
        self,
        *,
        width: int,
        num_prefix_tokens: int,
        embed: Callable[[torch.Tensor], torch.Tensor],
        pre_norm: Callable[[torch.Tensor], torch.Tensor],
        blocks: Sequence[nn.Module],
        run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        head: Callable[[torch.Tensor], torch.Tensor],
        patch_size: tuple[int, int],
        prompts_after_prefix: bool = False,
    ) -> None:
        self.width = width
        #: Insert prompts right after the prefix tokens whatever the placement: for towers whose
        #: attention only sees token order through rotary embeddings of the patches (Eva), where
        #: both placements give the same result once the prompts are removed.
        self.prompts_after_prefix = prompts_after_prefix
        self.patch_size = tuple(patch_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.embed, self.pre_norm, self.head = embed, pre_norm, head
        self.blocks = list(blocks)
        self.run_block = run_block

    @property
    def layers(self) -> int:
        return len(self.blocks)

    def encode(
        self,
        images: torch.Tensor,
        prompts: Sequence[torch.Tensor],
        placement: PromptPlacement = "after_cls",
    ) -> torch.Tensor:
        """Features of ``images`` with visual prompts.

        ``prompts[0]`` (``[n, width]`` or ``[B, n, width]``) is inserted into the embedded
        sequence; ``prompts[i]`` for ``i >= 1`` replaces those ``n`` tokens before block ``i``.
        """
        if not prompts:
            raise ValueError("visual prompts: give at least the input-layer prompt")
        x, _ = self._run(images, prompts, placement)
        return self.head(x)

    def encode_layers(
        self,
        images: torch.Tensor,
        layers: Sequence[int],
        prompts: Sequence[torch.Tensor] = (),
        placement: PromptPlacement = "after_cls",
        keep_prompts: bool = False,
    ) -> list[torch.Tensor]:
        """The token sequences ``[B, prefix + patches, width]`` after blocks ``layers`` (0-based),
        visual prompts (as in :meth:`encode`, or none) removed; the blocks after the deepest one
        asked for are not run (what a segmentation decoder reading intermediate layers needs).

        ``keep_prompts``: leave the prompts in, after the patches (``after_patches`` only), as
        TuneVLSeg's CLIPSeg decoder reads them: each layer as it enters the next block, i.e. with
        the next depth's deep prompt already in place (TuneVLSeg replaces them in place after the
        block, in the tensor it also hands the decoder)."""
        if not layers or min(layers) < 0 or max(layers) >= self.layers:
            raise ValueError(f"layers must be block indices 0..{self.layers - 1}, got {list(layers)}")
        _, taken = self._run(images, prompts, placement, collect=sorted(set(layers)), keep_prompts=keep_prompts)
        return [taken[i] for i in layers]

    def _run(
        self,
        images: torch.Tensor,
        prompts: Sequence[torch.Tensor],
        placement: PromptPlacement,
        collect: Sequence[int] = (),
        keep_prompts: bool = False,
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """The block loop: the final tokens (prompts removed; None when stopped early at the last
        block in ``collect``) and the tokens after each block in ``collect``."""
        if placement not in PLACEMENTS:
            raise ValueError(f"visual prompt placement must be one of {PLACEMENTS}, not {placement!r}")
        n = prompts[0].shape[-2] if prompts else 0
        for i, p in enumerate(prompts):
            if p.shape[-1] != self.width or p.shape[-2] != n:
                raise ValueError(
                    f"visual prompt {i} has shape {tuple(p.shape)}; expected [..., {n}, {self.width}] "
                    f"(the image tower's width is {self.width})"
                )
        x = self.embed(images)
        start = x.shape[1] if placement == "after_patches" and not self.prompts_after_prefix else self.num_prefix_tokens
        normed_prompts = placement != "after_cls_after_pre_norm"
        if prompts and normed_prompts:
            x = _insert_tokens(x, prompts[0].to(x.dtype), start)
        x = self.pre_norm(x)
        if prompts and not normed_prompts:
            x = _insert_tokens(x, prompts[0].to(x.dtype), start)
        taken: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if 1 <= i < len(prompts):
                x = _insert_tokens(x, prompts[i].to(x.dtype), start, replace=True)
            x = self.run_block(block, x)
            if i in collect:
                taken[i] = _layer_tokens(x, prompts, i, start, keep_prompts)
                if i == collect[-1]:
                    return None, taken
        return torch.cat([x[:, :start], x[:, start + n :]], dim=1), taken


def _layer_tokens(x: torch.Tensor, prompts: Sequence[torch.Tensor], block: int, start: int,
                  keep_prompts: bool) -> torch.Tensor:
    """The tokens after ``block`` handed to a reader of intermediate layers: prompts removed, or
    (``keep_prompts``, prompts after the patches) kept with the next block's prompt in place."""
    n = prompts[0].shape[-2] if prompts else 0
    if not keep_prompts:
        return torch.cat([x[:, :start], x[:, start + n :]], dim=1)
    if prompts and start + n != x.shape[1]:
        raise ValueError("keep_prompts needs the visual prompts after the patches (placement 'after_patches')")
    if block + 1 < len(prompts):
        return _insert_tokens(x, prompts[block + 1].to(x.dtype), start, replace=True)
    return x


def _insert_tokens(x: torch.Tensor, prompt: torch.Tensor, start: int, *, replace: bool = False) -> torch.Tensor:
    if prompt.dim() == 2:
        prompt = prompt.expand(x.shape[0], -1, -1)
    end = start + prompt.shape[1] if replace else start
    return torch.cat([x[:, :start], prompt, x[:, end:]], dim=1)


def vit_tower(visual: nn.Module) -> ViTTower:
    """Adapt an image tower for prompting; raise ``NotImplementedError`` naming what is supported."""
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return _open_clip_vit(visual)
    trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel wraps a timm model
    if trunk is not None and _timm_adapter(trunk) is not None:
        return _timm_adapter(trunk)(trunk, post=visual.head)
    if _timm_adapter(visual) is not None:
        return _timm_adapter(visual)(visual)
    inner = f" with a {type(trunk).__name__} trunk" if trunk is not None else ""
    raise NotImplementedError(
        f"visual prompts need a ViT image tower, but this model's is {type(visual).__name__}{inner}. "
        f"Supported: {'; '.join(SUPPORTED_TOWERS)}. Text-only methods (CoOp, CoCoOp, KgCoOp, "
        "zero-shot) work with any image tower."
    )


def _open_clip_vit(visual: nn.Module) -> ViTTower:
    transformer = visual.transformer
    batch_first = getattr(transformer, "batch_first", True)

    def embed(images: torch.Tensor) -> torch.Tensor:
        # open_clip's VisionTransformer._embeds without its final ln_pre, so prompts can join
        # the sequence before the pre-norm (as MaPLe does).
        x = visual.conv1(images.to(transformer.get_cast_dtype()))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.patch_dropout(x)

    def run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if batch_first:
            return run_block_maybe_checkpointed(transformer, block, x)
        return run_block_maybe_checkpointed(transformer, block, x.transpose(0, 1)).transpose(0, 1)

    def head(x: torch.Tensor) -> torch.Tensor:
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    return ViTTower(
        width=visual.conv1.out_channels,
        num_prefix_tokens=1,
        embed=embed,
        pre_norm=visual.ln_pre,
        blocks=transformer.resblocks,
        run_block=run_block,
        head=head,
        patch_size=tuple(visual.conv1.kernel_size),
    )


def _timm_adapter(model: nn.Module) -> Callable[..., ViTTower] | None:
    """The adapter for a timm tower vlprompt can prompt (``VisionTransformer``, ``Eva``), or None."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return timm_vit_tower
    if isinstance(model, Eva):
        return timm_eva_tower
    return None


def timm_vit_tower(model: nn.Module, post: nn.Module | None = None) -> ViTTower:
    """Adapt a timm ``VisionTransformer`` (``post`` is an extra head applied to its features)."""

    def embed(images: torch.Tensor) -> torch.Tensor:
        x = model._pos_embed(model.patch_embed(images))
        return model.patch_drop(x)

    def head(x: torch.Tensor) -> torch.Tensor:
        x = model.forward_head(model.norm(x))  # its head too: a projection in MobileCLIP, Identity for features
        return post(x) if post is not None else x

    return ViTTower(
        width=model.embed_dim,
        num_prefix_tokens=model.num_prefix_tokens,
        embed=embed,
        pre_norm=model.norm_pre,
        blocks=model.blocks,
        run_block=lambda block, x: run_block_maybe_checkpointed(model, block, x),
        head=head,
        patch_size=tuple(model.patch_embed.patch_size),
    )


def timm_eva_tower(model: nn.Module, post: nn.Module | None = None) -> ViTTower:
    """Adapt a timm ``Eva`` (EVA02, PE-Core). Its attention applies rotary position embeddings to
    the tokens after ``num_prefix_tokens``, which must be the patches: prompts go right after the
    prefix tokens, and each block's attention counts them as prefix while they are there (also
    when checkpointing recomputes the block). The absolute position embeddings are added before the
    prompts join, so attention sees the same thing whatever the placement."""
    state: dict[str, object] = {}
    index = {id(block): i for i, block in enumerate(model.blocks)}
    prefix = model.num_prefix_tokens

    def embed(images: torch.Tensor) -> torch.Tensor:
        x, rope = model._pos_embed(model.patch_embed(images))
        state["rope"], state["length"] = rope, x.shape[1]
        return x

    def run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rope = state["rope"]
        if rope is not None and getattr(model, "rope_mixed", False):
            rope = rope[index[id(block)]]
        extra = x.shape[1] - state["length"]

        def run(h: torch.Tensor) -> torch.Tensor:
            attn = block.attn
            saved = attn.num_prefix_tokens
            attn.num_prefix_tokens = prefix + extra
            try:
                return block(h, rope=rope)
            finally:
                attn.num_prefix_tokens = saved

        return run_block_maybe_checkpointed(model, run, x)

    def head(x: torch.Tensor) -> torch.Tensor:
        x = model.forward_head(model.norm(x))
        return post(x) if post is not None else x

    return ViTTower(
        width=model.embed_dim,
        num_prefix_tokens=prefix,
        embed=embed,
        pre_norm=model.norm_pre,
        blocks=model.blocks,
        run_block=run_block,
        head=head,
        patch_size=tuple(model.patch_embed.patch_size),
        prompts_after_prefix=True,
    )
