"""TuneVLSeg's optional "new last layer" (Adhikari et al., ACCV 2024; ``use_new_last_layer`` of its
``BaseCLIPSeg``): a trained convolution beside the frozen decoder's own upsampling, mixed into its
logits by a learnable ratio."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["LAST_LAYER_NAME", "LastLayerMix", "LastLayerSettings", "NewLastLayer", "configured_last_layer",
           "load_last_layer"]

log = logging.getLogger(__name__)

LastLayerMix = Literal["ratio", "sum"]

#: The file a trained new last layer is saved as, next to its prompt.
LAST_LAYER_NAME = "last_layer.safetensors"


@dataclass(frozen=True)
class LastLayerSettings:
    """How a :class:`NewLastLayer` is built (besides the decoder's width and the patch size)."""

    kernel_size: int = 5
    residual_ratio: float = 0.5
    mix: LastLayerMix = "ratio"


class NewLastLayer(nn.Module):
    """``extra = Conv2d(reduce_dim, 1, k, padding="same", padding_mode="replicate")(Upsample(
    patch_size, bilinear)(grid))`` on the decoder's last token grid ``[B, reduce_dim, h, w]``, then

    * ``mix="ratio"`` (TuneVLSeg's multimodal wrappers: MaPLe, shared-separate, shared-attention):
      ``(1 - r) * logits + r * extra`` with ``r`` a learned scalar starting at ``residual_ratio``
      (0.5), unconstrained as in TuneVLSeg;
    * ``mix="sum"`` (TuneVLSeg's VPT wrapper, which builds ``r`` but never uses it): ``logits + extra``.

    Both layers start from PyTorch's default initialisation. (TuneVLSeg's CoOp/CoCoOp wrapper
    calls transformers' decoder directly, so there the layer is built but has no effect.)

    Args:
        reduce_dim: the decoder's width.
        patch_size: the image tower's patch size (the upsampling factor).
        kernel_size: the convolution's kernel (5).
        residual_ratio: the initial ``r`` (0.5).
        mix: ``ratio`` or ``sum``.
    """

    def __init__(self, reduce_dim: int, patch_size: tuple[int, int], *, kernel_size: int = 5,
                 residual_ratio: float = 0.5, mix: LastLayerMix = "ratio") -> None:
        super().__init__()
        if mix not in ("ratio", "sum"):
            raise ValueError(f"new_last_layer_mix must be 'ratio' or 'sum', not {mix!r}")
        ph, pw = patch_size
        scale = float(ph) if ph == pw else (float(ph), float(pw))
        self.mix = mix
        self.kernel_size = kernel_size
        self.conv = nn.Sequential(
            nn.Upsample(scale_factor=scale, mode="bilinear"),
            nn.Conv2d(reduce_dim, 1, kernel_size=kernel_size, padding="same", padding_mode="replicate"),
        )
        if mix == "ratio":
            self.residual_ratio = nn.Parameter(torch.tensor(float(residual_ratio)))

    def layout(self) -> dict[str, Any]:
        """What rebuilds the layer (saved with its weights, :func:`~vlprompt.seg.heads.save_decoder_weights`)."""
        return {"kernel_size": self.kernel_size, "mix": self.mix, "reduce_dim": self.conv[1].in_channels}

    def forward(self, grid: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (``[B, 1, H, W]``, the decoder's) mixed with the layer's own of ``grid``."""
        extra = self.conv(grid.to(self.conv[1].weight.dtype))
        if extra.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"the new last layer gives {tuple(extra.shape[-2:])} logits, the decoder "
                             f"{tuple(logits.shape[-2:])}")
        if self.mix == "sum":
            return logits + extra
        return (1 - self.residual_ratio) * logits + self.residual_ratio * extra


def load_last_layer(path: str | Path, reduce_dim: int, patch_size: tuple[int, int]) -> NewLastLayer:
    """A new last layer saved with its layout (:func:`~vlprompt.seg.heads.save_decoder_weights`), rebuilt as it was saved (no pickle);
    refused when it was trained on a decoder of another width."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if int(meta.get("reduce_dim", reduce_dim)) != reduce_dim:
        raise ValueError(f"{path} was trained on a decoder {meta['reduce_dim']} wide; this one is {reduce_dim}")
    layer = NewLastLayer(reduce_dim, patch_size, kernel_size=int(meta.get("kernel_size", 5)),
                         mix=meta.get("mix", "ratio"))  # type: ignore[arg-type]
    layer.load_state_dict(load_file(str(path)))
    return layer


def configured_last_layer(reduce_dim: int, patch_size: tuple[int, int], init_prompt: str | None,
                          settings: LastLayerSettings | None) -> NewLastLayer | None:
    """The new last layer a segmenter starts from: the one saved with ``init_prompt`` (it replaces
    the configured one: the prompt was tuned with it), else a new one built from ``settings``, or
    none when ``settings`` is None and the prompt has none."""
    from vlprompt.zoo import prompt_file

    saved = prompt_file(init_prompt, LAST_LAYER_NAME)
    if saved is not None:
        log.info("init_prompt %s brings its trained new last layer", init_prompt)
        return load_last_layer(saved, reduce_dim, patch_size)
    if settings is None:
        return None
    return NewLastLayer(reduce_dim, patch_size, kernel_size=settings.kernel_size,
                        residual_ratio=settings.residual_ratio, mix=settings.mix)
