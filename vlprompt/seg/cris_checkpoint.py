"""CRIS's released weights (``DerrickWang005/CRIS.pytorch``'s ``best_model.pth``, or TuneVLSeg's
single-machine copy ``cris_best_single.pth``) as an open_clip ``local-dir:`` folder and a vlprompt
CRIS head.

CRIS's checkpoint holds its whole model (``state_dict``, keys under ``module.`` when saved from
distributed training, ``model.`` or nothing otherwise): ``backbone.*`` is OpenAI's CLIP in OpenAI's
layout, which open_clip's ``CLIP`` with a ``ModifiedResNet`` shares key for key, except
``backbone.visual.attnpool.connect.*``, CRIS's residual convolution, which is the head's
``connect``; ``neck.*``, ``decoder.*`` and ``proj.*`` are the head's own modules under the same
names. CRIS fine-tunes the CLIP it starts from, so the converted CLIP is CRIS's, not OpenAI's, and
its text context is as long as CRIS trained it (``positional_embedding``, 17 tokens for RefCOCO,
not 77). Read with ``torch.load(weights_only=True)``: no pickled code runs.

    python tools/convert_cris_checkpoint.py best_model.pth cris-rn50/
    # then: OpenCLIPBackbone("local-dir:cris-rn50"),
    #       PromptSegmenter(head="cris", decoder_weights="cris-rn50/cris_head.safetensors")
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from vlprompt.seg.cris import CRISHead

__all__ = ["clip_config_from_state", "convert_cris_checkpoint", "split_cris_state", "write_cris_checkpoint"]

#: CRIS's image preprocessing: OpenAI's normalisation, 416-pixel inputs (RefCOCO).
CRIS_PREPROCESS = {"size": 416, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "squash"}
_CONNECT = "visual.attnpool.connect."


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def split_cris_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """CRIS's state dict as (open_clip CLIP state, CRIS head state)."""
    state = _strip_prefix(state)
    unknown = sorted({k.split(".")[0] for k in state} - {"backbone", "neck", "decoder", "proj"})
    if unknown or not any(k.startswith("backbone.") for k in state):
        raise ValueError(f"not a CRIS checkpoint: expected backbone/neck/decoder/proj weights, found {unknown or 'no backbone'}")
    clip, head = {}, {}
    for key, value in state.items():
        if key.startswith("backbone." + _CONNECT):
            head["connect." + key.removeprefix("backbone." + _CONNECT)] = value
        elif key.startswith("backbone."):
            clip[key.removeprefix("backbone.")] = value
        else:
            head[key] = value
    return clip, head


def _count(state: dict[str, Any], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def clip_config_from_state(clip: dict[str, torch.Tensor], head_width: int = 64) -> dict[str, Any]:
    """open_clip's ``model_cfg`` for a CLIP with a ResNet image tower, read from its weights; the
    attention heads are not in them: ``head_width`` wide (OpenAI's 64)."""
    if "visual.layer1.0.conv1.weight" not in clip:
        raise ValueError("CRIS's CLIP has no ResNet image tower in this checkpoint")
    width = clip["visual.layer1.0.conv1.weight"].shape[0]
    grid = math.isqrt(clip["visual.attnpool.positional_embedding"].shape[0] - 1)
    text_width = clip["ln_final.weight"].shape[0]
    return {
        "embed_dim": clip["text_projection"].shape[1],
        "vision_cfg": {"image_size": grid * 32, "layers": [_count(clip, f"visual.layer{i}.") for i in range(1, 5)],
                       "width": width, "head_width": head_width},
        "text_cfg": {"context_length": clip["positional_embedding"].shape[0],
                     "vocab_size": clip["token_embedding.weight"].shape[0], "width": text_width,
                     "heads": text_width // head_width, "layers": _count(clip, "transformer.resblocks.")},
    }


def _head_from_state(head: dict[str, torch.Tensor], num_heads: int, dropout: float) -> CRISHead:
    """A CRIS head shaped like ``head``'s weights (heads and dropout are not in them: CRIS's 8 and 0.2)."""
    fpn_in = [head["neck.f3_v_proj.0.weight"].shape[1], head["neck.f2_v_proj.0.weight"].shape[1],
              head["neck.txt_proj.0.weight"].shape[1]]
    fpn_out = [head["neck.f3_v_proj.0.weight"].shape[0], head["neck.f2_v_proj.0.weight"].shape[0],
               head["neck.txt_proj.0.weight"].shape[0]]
    return CRISHead(fpn_in, fpn_out, vis_dim=fpn_out[1], word_dim=head["proj.txt.weight"].shape[1],
                    num_layers=_count(head, "decoder.layers."), num_heads=num_heads,
                    dim_ffn=head["decoder.layers.0.ffn.0.weight"].shape[0], dropout=dropout)


def convert_cris_checkpoint(path: str | Path, num_heads: int = 8, dropout: float = 0.2, head_width: int = 64
                            ) -> tuple[dict[str, Any], dict[str, torch.Tensor], CRISHead]:
    """Read CRIS's checkpoint: open_clip's ``model_cfg``, the CLIP's state dict and the CRIS head
    with its weights loaded (``num_heads``, ``dropout``: the decoder's; ``head_width``: the CLIP's
    attention head width; none of them is in the weights)."""
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no state dict in the checkpoint")
    clip, head_state = split_cris_state(state)
    head = _head_from_state(head_state, num_heads, dropout)
    head.load_state_dict(head_state)
    return clip_config_from_state(clip, head_width), clip, head


def write_cris_checkpoint(path: str | Path, out: str | Path, num_heads: int = 8, dropout: float = 0.2,
                          head_width: int = 64) -> Path:
    """Convert CRIS's checkpoint into ``out``: ``open_clip_config.json`` and
    ``open_clip_model.safetensors`` (an open_clip ``local-dir:`` model) and ``cris_head.safetensors``
    (the head, with its layout). Returns ``out``."""
    from safetensors.torch import save_file

    from vlprompt.seg.heads import save_decoder_weights
    from vlprompt.zoo import CRIS_HEAD_FILE

    cfg, clip, head = convert_cris_checkpoint(path, num_heads, dropout, head_width)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": CRIS_PREPROCESS},
                                                          indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in clip.items()}, str(out / "open_clip_model.safetensors"))
    save_decoder_weights(head, out / CRIS_HEAD_FILE)
    return out
