"""Exact shared-prefix encoding for causal text towers (prefix caching, as LLM servers do).

With a unified context before the class name, every class prompt starts with the same tokens
``[SOS] ctx_1 .. ctx_n``. In a causal tower those tokens never see what follows, so their hidden
states, and the keys and values they offer later tokens, are the same for every class: they are
computed once, and each class runs only its own suffix (class name, ".", EOT) against the cached
keys/values. Suffixes are grouped by length so no padding is computed. The result equals the
plain computation up to the order of floating-point sums (about 1e-6).

Two block layouts are handled here: open_clip's standard ``ResidualAttentionBlock``
(``nn.MultiheadAttention`` with one packed input projection) and Hugging Face CLIP's / CLIPSeg's
encoder layer (pre-norm, separate query/key/value projections); other blocks take the plain path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones.text import splice_prompt

__all__ = ["KVCache", "blocks_support_prefix_cache", "encode_prefix", "encode_suffix"]

#: Keys and values ``[G, heads, P, head_dim]`` of the shared prefix at each block.
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


#: Hugging Face encoder layers of the CLIP layout (``layer_norm1``, ``self_attn`` with
#: ``q_proj``/``k_proj``/``v_proj``/``out_proj``, ``layer_norm2``, ``mlp``), by class name.
_HF_CLIP_LAYERS = ("CLIPEncoderLayer", "CLIPSegEncoderLayer")


def blocks_support_prefix_cache(blocks: Sequence[nn.Module]) -> bool:
    """Whether every block is one this module can run: a plain open_clip
    ``ResidualAttentionBlock`` or a Hugging Face CLIP/CLIPSeg encoder layer."""
    from open_clip.transformer import ResidualAttentionBlock

    for block in blocks:
        if type(block).__name__ in _HF_CLIP_LAYERS:
            continue
        attn = getattr(block, "attn", None)
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            return False
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            return False
        if attn.bias_k is not None or attn.add_zero_attn:
            return False
    return True


def _heads(z: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, D]`` -> ``[B, heads, T, D / heads]``."""
    b, t, _ = z.shape
    return z.reshape(b, t, heads, -1).transpose(1, 2)


def _qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``[B, heads, T, head_dim]`` of the block's attention for ``x``."""
    attn = getattr(block, "self_attn", None)
    if attn is not None:  # Hugging Face CLIP layout
        h = block.layer_norm1(x)
        return tuple(_heads(proj(h), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    attn = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    return tuple(_heads(z, attn.num_heads) for z in qkv.chunk(3, dim=-1))


def _finish(block: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """The rest of the block's forward given the attention's inputs."""
    attn = getattr(block, "self_attn", None)
    if attn is not None:  # CLIPEncoderLayer.forward
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=attn.scale)
        x = x + attn.out_proj(out.transpose(1, 2).reshape(x.shape))
        return x + block.mlp(block.layer_norm2(x))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    x = x + block.ls_1(block.attn.out_proj(out.transpose(1, 2).reshape(x.shape)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def encode_prefix(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    attn_mask: torch.Tensor,
    deep_prompts: Sequence[torch.Tensor] = (),
    prompt_start: int = 1,
) -> KVCache:
    """Run the shared prefixes ``x`` (``[G, P, D]``, positional embeddings added) through
    ``blocks`` and return each block's keys and values; shared deep prompts (``[n, D]``, inside
    the prefix) replace tokens from ``prompt_start`` before blocks ``1..len(deep_prompts)``."""
    cache: KVCache = []
    length = x.shape[1]
    for i, block in enumerate(blocks):
        if 1 <= i <= len(deep_prompts):
            x = splice_prompt(x, deep_prompts[i - 1], prompt_start)
        q, k, v = _qkv(block, x)
        cache.append((k, v))
        if i < len(blocks) - 1:  # the prefix's output of the last block is never used
            x = _finish(block, x, q, k, v, attn_mask[:length, :length])
    return cache


def encode_suffix(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    cache: KVCache,
    attn_mask: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run suffixes ``x`` (``[N, S, D]``, at positions ``P..P+S-1``, positional embeddings added)
    through ``blocks``, attending to the cached prefix ``groups[n]`` (all to prefix 0 when None).
    ``attn_mask`` is the tower's causal mask."""
    prefix = cache[0][0].shape[2]
    mask = attn_mask[prefix : prefix + x.shape[1], : prefix + x.shape[1]]
    for block, (k_prefix, v_prefix) in zip(blocks, cache):
        q, k, v = _qkv(block, x)
        if groups is None:
            k_prefix, v_prefix = (t.expand(x.shape[0], -1, -1, -1) for t in (k_prefix, v_prefix))
        else:
            k_prefix, v_prefix = k_prefix[groups], v_prefix[groups]
        x = _finish(block, x, q, torch.cat([k_prefix, k], dim=2), torch.cat([v_prefix, v], dim=2), mask)
    return x
