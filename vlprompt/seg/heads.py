"""Segmentation heads over a prompted backbone: which head a segmenter uses (the decoder the model's
weights came with, vlprompt's CLIPSeg-style decoder, or CRIS's head over a ResNet CLIP), and saving
and loading their weights in safetensors with their layout, refusing a head of another layout.

A head declares what it reads (:class:`SegmentationHead`): ``image_input`` ``"layers"`` (a ViT's
tokens after ``extract_layers``) or ``"maps"`` (a ResNet's multi-scale maps), and ``text_input``
``"pooled"`` (one feature per prompt) or ``"tokens"`` (word features, padding and sentence feature,
:class:`~vlprompt.backbones.TextTokens`)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, ClassVar, Protocol

from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.seg.clipseg import DecoderBackbone, HFCLIPSegHead
from vlprompt.seg.cris import CRISHead
from vlprompt.seg.decoder import CLIPSegDecoder

__all__ = ["DECODER_NAME", "HEADS", "SegmentationHead", "build_head", "configured_head", "decoder_layout", "describe_layout",
           "load_decoder_weights", "prompt_head", "save_decoder_weights"]

log = logging.getLogger(__name__)

#: The values of a segmenter's ``head`` setting.
HEADS = ("auto", "model", "decoder", "cris")


class SegmentationHead(Protocol):
    """What a segmenter needs of a head: its ``kind`` and ``layout()`` (saved with its weights), the
    inputs it declares, and ``extract_layers`` (the ViT blocks it reads; None for ``maps`` heads)."""

    kind: str
    image_input: ClassVar[str]
    text_input: ClassVar[str]
    extract_layers: list[int] | None

    def layout(self) -> dict[str, Any]: ...


#: Layout entries of a saved CRIS head, by type (safetensors metadata holds strings).
_CRIS_LISTS, _CRIS_INTS, _CRIS_FLOATS = ("fpn_in", "fpn_out"), ("vis_dim", "word_dim", "num_layers", "num_heads",
                                                                 "dim_ffn"), ("dropout",)


def save_decoder_weights(decoder: nn.Module, path: str | Path) -> Path:
    """Save a segmentation head's weights (safetensors) with its ``layout()`` in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    meta = {k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in decoder.layout().items()}
    save_file(state, str(path), metadata=meta)
    return path


def decoder_layout(path: str | Path) -> dict[str, Any]:
    """The layout a saved head was built with (``head`` kind, ``extract_layers``, and for
    vlprompt's decoder ``reduce_dim``, ``n_heads``; what the file records)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decoder weights {path} not found")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    layout: dict[str, Any] = {"head": meta.get("head", CLIPSegDecoder.kind)}  # files from before heads had kinds
    if "extract_layers" in meta:
        layout["extract_layers"] = [int(x) for x in meta["extract_layers"].split(",")]
    layout.update({k: int(meta[k]) for k in ("reduce_dim", "n_heads") if k in meta})
    if layout["head"] == CRISHead.kind:
        layout.update({k: [int(x) for x in meta[k].split(",")] for k in _CRIS_LISTS if k in meta})
        layout.update({k: int(meta[k]) for k in _CRIS_INTS if k in meta})
        layout.update({k: float(meta[k]) for k in _CRIS_FLOATS if k in meta})
    return layout


def load_decoder_weights(decoder: nn.Module, path: str | Path) -> None:
    """Load weights saved by :func:`save_decoder_weights` (no pickle), refusing another layout."""
    from safetensors.torch import load_file

    layout = decoder_layout(path)
    if layout["head"] != decoder.kind:
        raise ValueError(f"{path} holds a {layout['head']} head, not a {decoder.kind} one (other backbone or head)")
    layers = layout.get("extract_layers")
    if layers is not None and layers != decoder.extract_layers:
        raise ValueError(f"{path} was trained reading layers {layers}, this decoder reads {decoder.extract_layers}")
    state = load_file(str(path))
    own = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state.items()}
    if own != saved:
        differ = sorted(k for k in set(own) | set(saved) if own.get(k) != saved.get(k))
        raise ValueError(f"{path} does not fit this decoder (other backbone or settings): {differ[:6]}")
    decoder.load_state_dict(state)


def build_cris_head(backbone: Backbone, extract_layers: list[int] | None, decoder_weights: str | None,
                    head_options: dict[str, Any] | None) -> CRISHead:
    """CRIS's head for ``backbone``: rebuilt with the layout ``decoder_weights`` records, else sized
    for the backbone with ``head_options`` (``num_layers``, ``num_heads``, ``dim_ffn``, ``dropout``)."""
    if extract_layers is not None:
        raise ValueError(f"extract_layers={extract_layers} is for ViT heads; CRIS reads the ResNet's maps")
    layout = decoder_layout(decoder_weights) if decoder_weights else {}
    if layout and layout["head"] != CRISHead.kind:
        raise ValueError(f"{decoder_weights} holds a {describe_layout(layout)}, not a CRIS head")
    if layout:
        return CRISHead(**{k: v for k, v in layout.items() if k != "head"})
    return CRISHead.for_backbone(backbone, **(head_options or {}))


def build_head(backbone: Backbone, head: str, extract_layers: list[int] | None, reduce_dim: int, n_heads: int,
               decoder_weights: str | None, head_options: dict[str, Any] | None = None) -> nn.Module:
    """The segmentation head ``head`` names for ``backbone`` (see :class:`~vlprompt.methods.PromptSegmenter`), with
    ``decoder_weights`` loaded; a saved vlprompt or CRIS head is rebuilt with the layout it records."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(map(repr, HEADS))}, not {head!r}")
    if decoder_weights and decoder_weights.startswith("zoo:"):
        from vlprompt.zoo import decoder_weights_path

        decoder_weights = str(decoder_weights_path(decoder_weights))
    own = backbone.vlsm_decoder() if isinstance(backbone, DecoderBackbone) else None
    if head == "cris" or (head == "auto" and own is None and backbone.has_image_maps):
        decoder = build_cris_head(backbone, extract_layers, decoder_weights, head_options)
        if decoder_weights:
            load_decoder_weights(decoder, decoder_weights)
        return decoder
    if head == "model" and own is None:
        raise ValueError(f"head='model': {type(backbone).__name__} {getattr(backbone, 'model_name', '')!r} brings no "
                         "segmentation decoder (CLIPSeg weights through HFCLIPBackbone do); use head='decoder'")
    if own is not None and head != "decoder":
        module, layers = own
        if extract_layers is not None and list(extract_layers) != layers:
            raise ValueError(f"the model's decoder reads layers {layers}; extract_layers={extract_layers} is for "
                             "head='decoder' (vlprompt's CLIPSeg-style decoder)")
        # A copy per segmenter: training one must not change the head another starts from.
        decoder: nn.Module = HFCLIPSegHead(copy.deepcopy(module), layers)
    else:
        layout = decoder_layout(decoder_weights) if decoder_weights else {}
        # A saved decoder is rebuilt as it was saved (layers, width, heads); layers configured
        # otherwise are refused when it is loaded below.
        layers = extract_layers if extract_layers is not None else layout.get("extract_layers")
        decoder = CLIPSegDecoder.for_backbone(backbone, layers, reduce_dim=layout.get("reduce_dim", reduce_dim),
                                              n_heads=layout.get("n_heads", n_heads))
    if decoder_weights:
        load_decoder_weights(decoder, decoder_weights)
    return decoder


#: The file a trained head is saved as, next to its prompt.
DECODER_NAME = "decoder.safetensors"


def prompt_head(prompt: str | Path | None) -> Path | None:
    """The trained head saved with a prompt folder (:meth:`~vlprompt.methods.PromptSegmenter.save_prompt`), None
    when there is none (a prompt tuned with the head frozen, or a checkpoint file)."""
    from vlprompt.zoo import prompt_file

    return prompt_file(prompt, DECODER_NAME)


def configured_head(backbone: Backbone, head: str, extract_layers: list[int] | None, reduce_dim: int, n_heads: int,
                    decoder_weights: str | None, init_prompt: str | None,
                    head_options: dict[str, Any] | None = None) -> tuple[nn.Module, bool]:
    """The head a segmenter starts from, and whether it is the trained head saved with
    ``init_prompt`` (which then replaces ``decoder_weights``)."""
    saved_head = prompt_head(init_prompt)
    if saved_head is None:
        return build_head(backbone, head, extract_layers, reduce_dim, n_heads, decoder_weights, head_options), False
    # The prompt was tuned with this head: starting from the prompt without it (from
    # decoder_weights, the head before tuning) would pair the prompt with another head.
    if decoder_weights:
        log.info("init_prompt %s brings its trained head; it replaces decoder_weights=%s", init_prompt, decoder_weights)
    try:
        return build_head(backbone, head, extract_layers, reduce_dim, n_heads, str(saved_head), head_options), True
    except ValueError as err:
        raise ValueError(f"init_prompt {init_prompt}: its trained head does not fit the configured one: {err}") from err


def describe_layout(layout: dict[str, Any]) -> str:
    details = ", ".join(f"{k} {v}" for k, v in layout.items() if k != "head")
    return f"{layout.get('head', '?')} head ({details})" if details else f"{layout.get('head', '?')} head"
