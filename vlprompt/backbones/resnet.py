"""CLIP's convolutional image tower (the ``ModifiedResNet`` of OpenAI CLIP and open_clip's ``RN50``
family) split into what dense prediction needs: the feature maps after each stage, and the
attention pool applied at every position instead of only to the mean token.

CRIS (Wang et al., "CRIS: CLIP-Driven Referring Image Segmentation", CVPR 2022) reads the maps of
the second and third stages (strides 8 and 16) and the attention pool run densely over the fourth
stage's map (stride 32): no mean (class) token, the pool's spatial positional embeddings resized
bicubically to the map, every position a query. The pool's own weights do the work; what CRIS adds
on top (a residual 1x1 convolution) belongs to its head, :mod:`vlprompt.seg.cris`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageMaps", "ResNetTower", "resnet_tower"]


class ImageMaps(NamedTuple):
    """Feature maps ``[B, C, H, W]`` of a convolutional image tower for one batch of images."""

    #: the outputs of the four stages (strides 4, 8, 16, 32)
    stages: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    #: the attention pool at every position of the last stage ``[B, embed_dim, H/32, W/32]``
    dense_pool: torch.Tensor


class ResNetTower:
    """open_clip's ``ModifiedResNet`` behind :meth:`encode_maps`. Every piece is read from the
    model when used, so ``.to()`` and copies stay in step."""

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        pool = visual.attnpool
        #: channels of the four stages' maps and of the densely pooled map
        self.stage_widths = tuple(_out_channels(getattr(visual, f"layer{i}")) for i in range(1, 5))
        self.embed_dim = pool.c_proj.out_features
        self.stride = 32

    def encode_maps(self, images: torch.Tensor) -> ImageMaps:
        """The four stages' maps and the dense attention pool of ``images`` ``[B, 3, H, W]``."""
        visual = self.visual
        x = visual.stem(images.to(visual.conv1.weight.dtype))
        stages = []
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = layer(x)
            stages.append(x)
        return ImageMaps(tuple(stages), dense_attention_pool(visual.attnpool, x))


def dense_attention_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIP's ``AttentionPool2d`` run at every position of ``x`` ``[B, C, H, W]`` as CRIS runs it:
    no mean token, the spatial positional embeddings (the pool's first row, the mean token's, is
    dropped) resized bicubically to ``H x W``, every position attending every position; the output
    projection gives ``[B, embed_dim, H, W]``."""
    b, c, h, w = x.shape
    side = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
    spatial = pool.positional_embedding[1:].reshape(1, side, side, c).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=(h, w), mode="bicubic", align_corners=False)
    tokens = x.reshape(b, c, h * w) + spatial.reshape(1, c, h * w).to(x.dtype)
    tokens = tokens.permute(2, 0, 1)  # (HW)NC
    out, _ = F.multi_head_attention_forward(
        query=tokens, key=tokens, value=tokens, embed_dim_to_check=c, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False,
    )
    return out.permute(1, 2, 0).reshape(b, -1, h, w)


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return last.bn3.num_features


def resnet_tower(visual: nn.Module) -> ResNetTower | None:
    """The adapter for a CLIP ``ModifiedResNet`` image tower, None for any other tower."""
    from open_clip.modified_resnet import ModifiedResNet

    return ResNetTower(visual) if isinstance(visual, ModifiedResNet) else None
