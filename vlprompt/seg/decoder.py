"""A CLIPSeg-style decoder over any prompted ViT backbone (Lüddecke & Ecker, "Image Segmentation
Using Text and Image Prompts", CVPR 2022).

The image tower's tokens at a few intermediate layers are projected to a small width, the deepest
first; the text feature conditions them by FiLM (a per-channel scale and shift) after the first
projection; each further layer is added and passed through a transformer block; the patch tokens
are then unfolded into a grid and a transposed convolution brings them back to pixels: one mask
logit per pixel. Any open_clip or timm ViT works, with or without visual prompts (the backbone
removes the prompts before the decoder sees the tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone

__all__ = ["CLIPSegDecoder", "default_extract_layers"]


def default_extract_layers(depth: int) -> list[int]:
    """CLIPSeg's choice scaled to a tower of ``depth`` blocks: blocks 3, 6 and 9 of 12 (0-based
    indices of the blocks whose outputs are read), i.e. a quarter, half and three quarters down."""
    return sorted({max(0, round(depth * f) - 1) for f in (0.25, 0.5, 0.75)})


class CLIPSegDecoder(nn.Module):
    """Mask logits ``[B, 1, H, W]`` from a backbone's intermediate image tokens and a conditioning
    (text) feature per image.

    Args:
        vision_width: width of the image tower's tokens.
        cond_dim: width of the conditioning feature (the joint embedding space).
        patch_size: pixels per patch (height, width).
        extract_layers: the image-tower blocks (0-based) whose outputs are read.
        reduce_dim: width inside the decoder (64 in CLIPSeg).
        n_heads: attention heads of the decoder's blocks (4 in CLIPSeg).
    """

    def __init__(self, vision_width: int, cond_dim: int, patch_size: tuple[int, int], extract_layers: Sequence[int],
                 reduce_dim: int = 64, n_heads: int = 4) -> None:
        super().__init__()
        self.extract_layers = list(extract_layers)
        n_layers = len(self.extract_layers)
        self.reduces = nn.ModuleList(nn.Linear(vision_width, reduce_dim) for _ in range(n_layers))
        self.film_mul = nn.Linear(cond_dim, reduce_dim)
        self.film_add = nn.Linear(cond_dim, reduce_dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(reduce_dim, n_heads, dim_feedforward=4 * reduce_dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(n_layers))
        self.trans_conv = nn.ConvTranspose2d(reduce_dim, 1, kernel_size=patch_size, stride=patch_size)

    kind = "clipseg-style"
    #: what the head reads (:class:`~vlprompt.seg.heads.SegmentationHead`): ViT layers, one text feature per prompt
    image_input: ClassVar[str] = "layers"
    text_input: ClassVar[str] = "pooled"

    def layout(self) -> dict[str, Any]:
        """What a saved copy of this decoder records, to be rebuilt and to refuse another layout."""
        return {"head": self.kind, "extract_layers": self.extract_layers, "reduce_dim": self.film_mul.out_features,
                "n_heads": self.blocks[0].self_attn.num_heads}

    @classmethod
    def for_backbone(cls, backbone: Backbone, extract_layers: Sequence[int] | None = None, **kwargs) -> CLIPSegDecoder:
        """A decoder sized for ``backbone`` (reading ``extract_layers``, by default
        :func:`default_extract_layers` of its depth)."""
        layers = list(extract_layers) if extract_layers is not None else default_extract_layers(backbone.vision_layers)
        return cls(backbone.vision_width, backbone.embed_dim, backbone.patch_size, layers, **kwargs)

    @property
    def reduce_dim(self) -> int:
        return self.film_mul.out_features

    def forward(self, layer_tokens: Sequence[torch.Tensor], cond: torch.Tensor, prefix_tokens: int,
                image_size: tuple[int, int], *, trailing_tokens: int = 0,
                last_layer: nn.Module | None = None) -> torch.Tensor:
        """``layer_tokens``: the tokens of each read layer, shallowest first (``[B, prefix + h*w
        (+ trailing), vision_width]``); ``cond``: ``[B, cond_dim]``; ``image_size``: the input's
        (H, W); ``trailing_tokens``: tokens after the patches (visual prompts carried through the
        decoder, TuneVLSeg's way) dropped before the grid; ``last_layer``: a
        :class:`~vlprompt.seg.last_layer.NewLastLayer` mixed into the logits."""
        if len(layer_tokens) != len(self.reduces):
            raise ValueError(f"the decoder reads {len(self.reduces)} layers, got {len(layer_tokens)}")
        cond = cond.float()
        a = None
        for i, (tokens, reduce, block) in enumerate(zip(reversed(layer_tokens), self.reduces, self.blocks)):
            reduced = reduce(tokens.float())
            a = reduced if a is None else a + reduced
            if i == 0:
                a = self.film_mul(cond)[:, None] * a + self.film_add(cond)[:, None]
            a = block(a)
        patches = a[:, prefix_tokens : a.shape[1] - trailing_tokens]
        ph, pw = self.trans_conv.stride
        h, w = image_size[0] // ph, image_size[1] // pw
        if patches.shape[1] != h * w:
            raise ValueError(f"{patches.shape[1]} patch tokens do not tile a {image_size} image in {ph}x{pw} patches")
        grid = patches.transpose(1, 2).reshape(a.shape[0], -1, h, w)
        logits = self.trans_conv(grid)
        if last_layer is not None:
            logits = last_layer(grid, logits)
        if logits.shape[-2:] != tuple(image_size):
            logits = F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)
        return logits
