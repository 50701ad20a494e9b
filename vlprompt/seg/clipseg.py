"""CLIPSeg's own decoder (Hugging Face ``transformers``, e.g. ``CIDAS/clipseg-rd64-refined``) as a
segmentation head over vlprompt's prompted towers.

:class:`~vlprompt.backbones.HFCLIPBackbone` wraps CLIPSeg's CLIP towers; its decoder comes here and
reads the layers CLIPSeg reads (``config.extract_layers``) from the prompted image tower, prompts
already removed, conditioned on the prompted text feature. With no prompts the output equals
``CLIPSegForImageSegmentation``'s own logits. vlprompt runs the image tower only up to the deepest
layer the decoder reads, as TuneVLSeg's visual and multimodal CLIPSeg wrappers do (CLIPSeg's original
code, ``CLIPDensePredT.forward``, and ``transformers`` run every block; the blocks after the deepest
read layer do not change the output).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DecoderBackbone", "HFCLIPSegHead"]


@runtime_checkable
class DecoderBackbone(Protocol):
    """A backbone that may bring the segmentation decoder its weights came with (CLIPSeg's, through
    :class:`~vlprompt.backbones.HFCLIPBackbone`): ``vlsm_decoder()`` gives the decoder module and the
    image-tower layers it reads, or None when these weights have none."""

    def vlsm_decoder(self) -> tuple[nn.Module, list[int]] | None: ...


class HFCLIPSegHead(nn.Module):
    """Mask logits ``[B, 1, H, W]`` from CLIPSeg's ``transformers`` decoder, with the interface of
    :class:`~vlprompt.seg.CLIPSegDecoder` (``extract_layers``; ``forward(layer_tokens, cond,
    prefix_tokens, image_size)``).

    Args:
        decoder: a ``transformers`` ``CLIPSegDecoder`` (``CLIPSegForImageSegmentation.decoder``).
        extract_layers: the vision blocks (0-based) it reads, ``config.extract_layers``.
    """

    kind = "clipseg-transformers"
    #: what the head reads (:class:`~vlprompt.seg.heads.SegmentationHead`): ViT layers, one text feature per prompt
    image_input: ClassVar[str] = "layers"
    text_input: ClassVar[str] = "pooled"

    def __init__(self, decoder: nn.Module, extract_layers: Sequence[int]) -> None:
        super().__init__()
        self.decoder = decoder
        self.extract_layers = list(extract_layers)

    def layout(self) -> dict[str, Any]:
        """What a saved copy of this head records (to refuse loading it into another layout)."""
        return {"head": self.kind, "extract_layers": self.extract_layers}

    @property
    def reduce_dim(self) -> int:
        return self.decoder.film_mul.out_features

    def forward(self, layer_tokens: Sequence[torch.Tensor], cond: torch.Tensor, prefix_tokens: int,
                image_size: tuple[int, int], *, trailing_tokens: int = 0,
                last_layer: nn.Module | None = None) -> torch.Tensor:
        """As :meth:`vlprompt.seg.CLIPSegDecoder.forward`. With ``trailing_tokens`` (visual prompts
        carried through the decoder) or a ``last_layer`` the decoder's modules are run as
        TuneVLSeg's ``decoder_forward`` runs them, else through ``transformers``' own forward."""
        if prefix_tokens != 1:
            raise ValueError(f"CLIPSeg's decoder drops one class token, but the tower has {prefix_tokens} prefix tokens")
        patches = layer_tokens[0].shape[1] - 1 - trailing_tokens
        if math.isqrt(patches) ** 2 != patches:
            raise ValueError(f"CLIPSeg's decoder needs a square grid of patches, got {patches} for a {tuple(image_size)} "
                             "image: resize to a square (the datamodules do)")
        dtype = self.decoder.film_mul.weight.dtype
        tokens, cond = [t.to(dtype) for t in layer_tokens], cond.to(dtype)
        if trailing_tokens or last_layer is not None:
            logits = self._run_modules(tokens, cond, trailing_tokens, last_layer).float()
        else:
            out = self.decoder(tokens, cond)
            logits = out.logits if hasattr(out, "logits") else out[0]
            logits = logits.reshape(len(cond), 1, *logits.shape[-2:]).float()  # transformers squeezes the channel
        if logits.shape[-2:] != tuple(image_size):
            logits = F.interpolate(logits, size=tuple(image_size), mode="bilinear", align_corners=False)
        return logits

    def _run_modules(self, tokens: list[torch.Tensor], cond: torch.Tensor, trailing_tokens: int,
                     last_layer: nn.Module | None) -> torch.Tensor:
        """The decoder's modules in transformers' order (deepest layer first, FiLM at
        ``conditional_layer``); the class token and ``trailing_tokens`` dropped only after its
        blocks; logits ``[B, 1, H, W]``."""
        d = self.decoder
        out: torch.Tensor | None = None
        for i, (tokens_i, layer, reduce) in enumerate(zip(tokens[::-1], d.layers, d.reduces)):
            out = reduce(tokens_i) if out is None else reduce(tokens_i) + out
            if i == d.conditional_layer:
                out = d.film_mul(cond)[:, None] * out + d.film_add(cond)[:, None]
            out = _run_decoder_layer(layer, out)
        grid = out[:, 1 : out.shape[1] - trailing_tokens].transpose(1, 2)
        size = math.isqrt(grid.shape[2])
        grid = grid.reshape(len(cond), grid.shape[1], size, size)
        logits = d.transposed_convolution(grid)
        return last_layer(grid, logits) if last_layer is not None else logits


def _run_decoder_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One ``CLIPSegDecoderLayer`` without masks (transformers 4 takes a causal mask argument and
    returns a tuple; 5 neither)."""
    takes_causal = "causal_attention_mask" in inspect.signature(layer.forward).parameters
    out = layer(x, None, None) if takes_causal else layer(x, None)
    return out[0] if isinstance(out, tuple) else out
