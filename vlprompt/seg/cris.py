"""CRIS's head over a prompted CLIP with a ResNet image tower (Wang et al., "CRIS: CLIP-Driven
Referring Image Segmentation", CVPR 2022), the second VLSM of TuneVLSeg.

The image tower gives three maps (:meth:`~vlprompt.backbones.Backbone.encode_image_maps`): C3 and C4,
the outputs of the second and third ResNet stages (strides 8 and 16), and C5, CLIP's attention pool
run at every position of the last stage (stride 32) plus a residual 1x1 convolution of that stage
(``connect``, CRIS's own weights). The text tower gives the prompt's word features (after the final
norm, not projected) with a padding mask, and its sentence feature ``state`` (the pooled, projected
feature). Then:

* the neck (:class:`CRISNeck`, CRIS's "multi-modal FPN") multiplies the projected C5 by the
  projected sentence feature, fuses it top-down with C4 and C3, and aggregates the three levels at
  stride 16 with coordinate features;
* the decoder (:class:`CRISDecoder`) runs transformer layers over the visual tokens: self-attention
  with 2-D sine positions, cross-attention to the word features (1-D sine positions, padding
  masked), a feed-forward block; pre-norm, with an extra norm on each attention output;
* the projector (:class:`CRISProjector`) upsamples the result four times and convolves it with a
  3x3 kernel and bias generated from the sentence feature (one dynamic kernel per image);
* the mask logits (stride 4) are resized bicubically (``align_corners=True``) to the image.

Parameter names follow CRIS's own modules (``neck``, ``decoder``, ``proj``), so CRIS's released
weights map onto them key for key (:mod:`vlprompt.seg.cris_checkpoint`).

Where vlprompt differs on purpose: a frozen head stays in evaluation mode while the prompt trains
(TuneVLSeg's Lightning module switches its frozen CRIS to training mode, so its BatchNorm layers
normalise with batch statistics and update their running statistics, and its dropout is active).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone, TextTokens

__all__ = ["CRISDecoder", "CRISDecoderLayer", "CRISHead", "CRISLastLayer", "CRISNeck", "CRISProjector",
           "sine_positions_1d", "sine_positions_2d"]


def conv_bn_relu(in_dim: int, out_dim: int, kernel_size: int = 1, padding: int = 0) -> nn.Sequential:
    """Convolution (no bias), batch norm, ReLU: CRIS's ``conv_layer``."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel_size, 1, padding, bias=False), nn.BatchNorm2d(out_dim),
                         nn.ReLU())


def linear_bn_relu(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear (no bias), batch norm, ReLU: CRIS's ``linear_layer``."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU())


class CoordConv(nn.Module):
    """A 3x3 ``conv_bn_relu`` over the input with two channels of normalised x and y coordinates
    (-1 to 1) appended."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_dim + 2, out_dim, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        y, x_coord = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([x_coord, y]).expand(b, -1, -1, -1)
        return self.conv1(torch.cat([x, coords], dim=1))


class CRISNeck(nn.Module):
    """CRIS's multi-modal FPN: ``(C3, C4, C5)`` and the sentence feature to one map at C4's
    resolution with ``out_channels[1]`` channels.

    Args:
        in_channels: channels of C3, C4 and C5 (C5's is also the sentence feature's width).
        out_channels: widths of the fused levels (``out_channels[1]`` is the decoder's width).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]) -> None:
        super().__init__()
        if len(in_channels) != 3 or len(out_channels) != 3:
            raise ValueError(f"CRIS's neck fuses three levels: got in {list(in_channels)}, out {list(out_channels)}")
        c3, c4, c5 = in_channels
        o3, o4, o5 = out_channels
        self.txt_proj = linear_bn_relu(c5, o5)
        self.f1_v_proj = conv_bn_relu(c5, o5, 1, 0)
        self.norm_layer = nn.Sequential(nn.BatchNorm2d(o5), nn.ReLU())
        self.f2_v_proj = conv_bn_relu(c4, o4, 3, 1)
        self.f2_cat = conv_bn_relu(o5 + o4, o4, 1, 0)
        self.f3_v_proj = conv_bn_relu(c3, o3, 3, 1)
        self.f3_cat = conv_bn_relu(o3 + o4, o4, 1, 0)
        self.f4_proj5 = conv_bn_relu(o5, o4, 3, 1)
        self.f4_proj4 = conv_bn_relu(o4, o4, 3, 1)
        self.f4_proj3 = conv_bn_relu(o4, o4, 3, 1)
        self.aggr = conv_bn_relu(3 * o4, o4, 1, 0)
        self.coordconv = nn.Sequential(CoordConv(o4, o4), conv_bn_relu(o4, o4, 3, 1))

    def forward(self, maps: Sequence[torch.Tensor], state: torch.Tensor) -> torch.Tensor:
        v3, v4, v5 = maps
        sentence = self.txt_proj(state)[:, :, None, None]
        f5 = self.norm_layer(self.f1_v_proj(v5) * sentence)
        f4 = self.f2_cat(torch.cat([self.f2_v_proj(v4), F.interpolate(f5, scale_factor=2, mode="bilinear")], dim=1))
        f3 = F.avg_pool2d(self.f3_v_proj(v3), 2, 2)
        f3 = self.f3_cat(torch.cat([f3, f4], dim=1))
        fq5 = F.interpolate(self.f4_proj5(f5), scale_factor=2, mode="bilinear")
        fq = self.aggr(torch.cat([self.f4_proj3(f3), self.f4_proj4(f4), fq5], dim=1))
        return self.coordconv(fq)


def _frequencies(width: int, like: torch.Tensor) -> torch.Tensor:
    """``10000^(-2i/width)`` for ``i = 0 .. width/2 - 1``, in ``like``'s dtype and device."""
    return 1e-4 ** (torch.arange(0, width, 2, device=like.device, dtype=like.dtype) / width)


def sine_positions_1d(width: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """Sine/cosine positions ``[length, 1, width]`` (sine in even channels, cosine in odd)."""
    if width % 2:
        raise ValueError(f"sine positions need an even width, got {width}")
    angles = torch.arange(length, device=like.device, dtype=like.dtype)[:, None] * _frequencies(width, like)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(length, 1, width)


def sine_positions_2d(width: int, height: int, breadth: int, like: torch.Tensor) -> torch.Tensor:
    """2-D sine/cosine positions ``[height * breadth, 1, width]``: the first half of the channels
    encodes the column (sine, cosine interleaved), the second half the row."""
    if width % 4:
        raise ValueError(f"2-D sine positions need a width divisible by 4, got {width}")
    half = width // 2
    cols = sine_positions_1d(half, breadth, like)[:, 0]  # [W, half]
    rows = sine_positions_1d(half, height, like)[:, 0]  # [H, half]
    grid = torch.cat([cols[None].expand(height, -1, -1), rows[:, None].expand(-1, breadth, -1)], dim=-1)
    return grid.reshape(height * breadth, 1, width)


class CRISDecoderLayer(nn.Module):
    """One layer of CRIS's vision-language decoder over sequence-first tokens."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, kdim=d_model, vdim=d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.ReLU(), nn.Dropout(dropout),
                                 nn.LayerNorm(dim_feedforward), nn.Linear(dim_feedforward, d_model))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, vis: torch.Tensor, txt: torch.Tensor, vis_pos: torch.Tensor, txt_pos: torch.Tensor,
                pad_mask: torch.Tensor) -> torch.Tensor:
        """``vis`` ``[HW, B, D]``, ``txt`` ``[L, B, D]``, positions ``[HW or L, 1, D]``,
        ``pad_mask`` ``[B, L]`` (True: padding)."""
        q = self.norm1(vis) + vis_pos
        vis = vis + self.dropout1(self.self_attn_norm(self.self_attn(q, q, value=self.norm1(vis))[0]))
        attended = self.multihead_attn(query=self.norm2(vis) + vis_pos, key=txt + txt_pos, value=txt,
                                       key_padding_mask=pad_mask)[0]
        vis = vis + self.dropout2(self.cross_attn_norm(attended))
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class CRISDecoder(nn.Module):
    """CRIS's vision-language decoder: ``num_layers`` :class:`CRISDecoderLayer` and a final norm.
    ``forward(vis [B, D, H, W], words [B, L, D], padding [B, L]) -> [B, D, H*W]``."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_ffn: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CRISDecoderLayer(d_model, nhead, dim_ffn, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, vis: torch.Tensor, words: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        b, c, h, w = vis.shape
        vis_pos = sine_positions_2d(c, h, w, vis)
        txt_pos = sine_positions_1d(words.shape[-1], words.shape[1], words)
        out = vis.reshape(b, c, h * w).permute(2, 0, 1)
        txt = words.permute(1, 0, 2)
        for layer in self.layers:
            out = layer(out, txt, vis_pos, txt_pos, padding)
        return self.norm(out).permute(1, 2, 0)


class CRISProjector(nn.Module):
    """Upsample the decoded map four times and convolve it with a ``kernel_size`` kernel and bias
    generated from the sentence feature (one dynamic kernel per image): mask logits ``[B, 1, 4H, 4W]``.

    Args:
        word_dim: width of the sentence feature.
        in_dim: half the decoded map's width.
        kernel_size: side of the dynamic kernel (3).
    """

    def __init__(self, word_dim: int, in_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.in_dim, self.kernel_size = in_dim, kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"), conv_bn_relu(in_dim * 2, in_dim * 2, 3, 1),
            nn.Upsample(scale_factor=2, mode="bilinear"), conv_bn_relu(in_dim * 2, in_dim, 3, 1),
            nn.Conv2d(in_dim, in_dim, 1))
        self.txt = nn.Linear(word_dim, in_dim * kernel_size * kernel_size + 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        x = self.vis(x)
        b, c, h, w = x.shape
        kernel = self.txt(state)
        weight = kernel[:, :-1].reshape(b, c, self.kernel_size, self.kernel_size)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, bias=kernel[:, -1], padding=self.kernel_size // 2, groups=b)
        return out.transpose(0, 1)


class CRISLastLayer(nn.Module):
    """TuneVLSeg's "new last layer" on CRIS (``COOPCRIS``'s ``additive_decoder_layer``): the decoded
    map ``[B, vis_dim, h, w]`` through a 1x1 convolution (no bias) to ``width`` channels, bilinear
    upsampling to the image, a ``kernel_size`` convolution (replicate padding) to one channel, mixed
    into CRIS's logits by a learnable ratio ``r`` (starting at ``residual_ratio``, unconstrained):
    ``(1 - r) * logits + r * extra``. Trained with the prompt while the head stays frozen."""

    kind = "cris-last-layer"

    def __init__(self, vis_dim: int, kernel_size: int = 5, residual_ratio: float = 0.5, width: int = 64) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(vis_dim, width, 1, bias=False)
        self.conv = nn.Conv2d(width, 1, kernel_size, padding="same", padding_mode="replicate")
        self.residual_ratio = nn.Parameter(torch.tensor(float(residual_ratio)))

    def layout(self) -> dict[str, Any]:
        return {"head": self.kind, "vis_dim": self.reduce.in_channels, "width": self.reduce.out_channels,
                "kernel_size": self.conv.kernel_size[0]}

    def forward(self, decoded: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        extra = F.interpolate(self.reduce(decoded), size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return (1 - self.residual_ratio) * logits + self.residual_ratio * self.conv(extra)


class CRISHead(nn.Module):
    """CRIS's head (see the module docstring): mask logits ``[B, 1, H, W]`` from the image tower's
    maps and the prompt's word features and sentence feature.

    Args:
        fpn_in: channels of C3, C4 and C5 (C5's is the joint embedding width).
        fpn_out: widths of the neck's three levels; ``fpn_out[1]`` is the decoder's width.
        vis_dim: the decoder's width (``fpn_out[1]``; the text tower's width, as its word features
            are attended without projection).
        word_dim: width of the sentence feature (the joint embedding width).
        num_layers, num_heads, dim_ffn, dropout: the decoder's depth, heads, feed-forward width,
            dropout (3, 8, 2048, 0.2 in CRIS with RN50).
    """

    kind = "cris"
    #: what the head reads: the image tower's multi-scale maps, and per-token text features
    image_input: ClassVar[str] = "maps"
    text_input: ClassVar[str] = "tokens"
    #: CRIS reads no ViT layers (the segmenter's layer-reading heads have a list here)
    extract_layers: ClassVar[None] = None

    def __init__(self, fpn_in: Sequence[int], fpn_out: Sequence[int], vis_dim: int, word_dim: int, num_layers: int = 3,
                 num_heads: int = 8, dim_ffn: int = 2048, dropout: float = 0.2) -> None:
        super().__init__()
        if fpn_out[1] != vis_dim or vis_dim % 4:
            raise ValueError(f"CRIS's decoder width vis_dim={vis_dim} must equal fpn_out[1]={fpn_out[1]} and be "
                             "divisible by 4 (2-D sine positions)")
        if fpn_in[2] != word_dim:
            raise ValueError(f"C5's channels fpn_in[2]={fpn_in[2]} must equal the sentence feature's width {word_dim}")
        self.settings = {"fpn_in": list(fpn_in), "fpn_out": list(fpn_out), "vis_dim": vis_dim, "word_dim": word_dim,
                         "num_layers": num_layers, "num_heads": num_heads, "dim_ffn": dim_ffn, "dropout": dropout}
        self.connect = nn.Sequential(nn.Conv2d(self.stage_width_needed(fpn_in), word_dim, 1, bias=False),
                                     nn.BatchNorm2d(word_dim))
        self.neck = CRISNeck(fpn_in, fpn_out)
        self.decoder = CRISDecoder(num_layers, vis_dim, num_heads, dim_ffn, dropout)
        self.proj = CRISProjector(word_dim, vis_dim // 2, 3)

    @staticmethod
    def stage_width_needed(fpn_in: Sequence[int]) -> int:
        """Channels of the last ResNet stage (``connect``'s input): twice C4's, as in every CLIP ResNet."""
        return 2 * fpn_in[1]

    @classmethod
    def for_backbone(cls, backbone: Backbone, **kwargs: Any) -> CRISHead:
        """A head sized for ``backbone`` (a CLIP with a ResNet image tower): C3/C4 from its second
        and third stages, the decoder as wide as its text tower (CRIS with RN50: 512/1024/1024 in,
        256/512/1024 out)."""
        if not backbone.has_image_maps:
            raise ValueError(f"CRIS needs a CLIP with a ResNet image tower (open_clip RN50-style); "
                             f"{type(backbone).__name__} {getattr(backbone, 'model_name', '')!r} has none")
        widths = backbone.image_map_widths
        width = backbone.text_width
        return cls([widths[1], widths[2], backbone.embed_dim], [width // 2, width, backbone.embed_dim], width,
                   backbone.embed_dim, **kwargs)

    def layout(self) -> dict[str, Any]:
        """What a saved copy of this head records, to be rebuilt and to refuse another layout."""
        return {"head": self.kind, **self.settings}

    def train(self, mode: bool = True) -> CRISHead:
        """Parts without trainable parameters stay in evaluation mode (see the module docstring)."""
        super().train(mode)
        for part in self.children():
            part.train(mode and any(p.requires_grad for p in part.parameters()))
        return self

    def requires_grad_(self, requires_grad: bool = True) -> CRISHead:
        """Freezing or unfreezing also sets the parts' modes (a frozen part stays in evaluation mode)."""
        super().requires_grad_(requires_grad)
        return self.train(self.training)

    def visual_maps(self, maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """C3, C4 and C5 from the frozen image tower's maps ``[stage 2, stage 3, stage 4, dense
        attention pool]`` (:func:`~vlprompt.seg.cris_inputs.image_map_inputs`): C5 is the dense
        pool plus ``connect`` of stage 4, through a ReLU (CRIS's attention pool)."""
        c3, c4, last, dense = (m.to(self.connect[0].weight.dtype) for m in maps)
        return c3, c4, F.relu(dense + self.connect(last))

    @staticmethod
    def image_features(visual: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The image feature TuneVLSeg gives CoCoOp on CRIS: C5 averaged over positions ``[B, embed_dim]``."""
        return visual[2].mean((2, 3))

    def forward(self, visual: tuple[torch.Tensor, torch.Tensor, torch.Tensor], text: TextTokens,
                image_size: tuple[int, int], last_layer: CRISLastLayer | None = None) -> torch.Tensor:
        """``visual``: :meth:`visual_maps`; ``text``: each image's prompt's word features, padding
        and sentence feature; ``image_size``: the input's (H, W); ``last_layer``: TuneVLSeg's new
        last layer mixed into the logits."""
        dtype = self.connect[0].weight.dtype
        state, words = text.state.to(dtype), text.words.to(dtype)
        if words.shape[-1] != self.settings["vis_dim"]:
            raise ValueError(f"CRIS's decoder attends {self.settings['vis_dim']}-wide word features; the text tower "
                             f"gives {words.shape[-1]}")
        fq = self.neck(visual, state)
        b, c, h, w = fq.shape
        fq = self.decoder(fq, words, text.padding).reshape(b, c, h, w)
        logits = F.interpolate(self.proj(fq, state), size=tuple(image_size), mode="bicubic", align_corners=True)
        return logits if last_layer is None else last_layer(fq, logits)
