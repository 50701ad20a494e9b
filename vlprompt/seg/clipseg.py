"""CLIPSeg's own decoder (Hugging Face ``transformers``, e.g. ``CIDAS/clipseg-rd64-refined``) as a
segmentation head over vlprompt's prompted towers.

:class:`~vlprompt.backbones.HFCLIPBackbone` wraps CLIPSeg's CLIP towers; its decoder comes here and
reads the layers CLIPSeg reads (``config.extract_layers``) from the prompted image tower, prompts
already removed, conditioned on the prompted text feature. With no prompts the output equals
``CLIPSegForImageSegmentation``'s own logits. vlprompt runs the image tower only up to the deepest
layer the decoder reads (CLIPSeg's original code does too; ``transformers`` runs all of it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

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

    def __init__(self, decoder: nn.Module, extract_layers: Sequence[int]) -> None:
        super().__init__()
        self.decoder = decoder
        self.extract_layers = list(extract_layers)

    def layout(self) -> dict[str, Any]:
        """What a saved copy of this head records (to refuse loading it into another layout)."""
        return {"head": self.kind, "extract_layers": self.extract_layers}

    def forward(self, layer_tokens: Sequence[torch.Tensor], cond: torch.Tensor, prefix_tokens: int,
                image_size: tuple[int, int]) -> torch.Tensor:
        if prefix_tokens != 1:
            raise ValueError(f"CLIPSeg's decoder drops one class token, but the tower has {prefix_tokens} prefix tokens")
        patches = layer_tokens[0].shape[1] - 1
        if math.isqrt(patches) ** 2 != patches:
            raise ValueError(f"CLIPSeg's decoder needs a square grid of patches, got {patches} for a {tuple(image_size)} "
                             "image: resize to a square (the datamodules do)")
        dtype = self.decoder.film_mul.weight.dtype
        out = self.decoder([t.to(dtype) for t in layer_tokens], cond.to(dtype))
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits = logits.reshape(len(cond), 1, *logits.shape[-2:]).float()  # transformers squeezes the channel
        if logits.shape[-2:] != tuple(image_size):
            logits = F.interpolate(logits, size=tuple(image_size), mode="bilinear", align_corners=False)
        return logits
