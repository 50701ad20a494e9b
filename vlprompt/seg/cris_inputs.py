"""What a segmenter gives CRIS's head (:class:`~vlprompt.seg.cris.CRISHead`): the ResNet maps it
reads (packed into one tensor per image for the segmenter's feature cache), and each image's
prompt's word features, taken from the same text pass as the prompt learner's features."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from vlprompt.backbones import Backbone, TextTokens
from vlprompt.seg.cris import CRISLastLayer
from vlprompt.seg.last_layer import LAST_LAYER_NAME, LastLayerSettings

__all__ = ["MapPacking", "cris_last_layer", "image_map_inputs", "prompt_text_tokens", "refuse_visual_prompts"]

log = logging.getLogger(__name__)


def image_map_inputs(backbone: Backbone, images: torch.Tensor) -> list[torch.Tensor]:
    """The frozen image tower's maps CRIS reads: the second, third and fourth stages and the
    dense attention pool (CRIS's own ``connect`` on the fourth stage is the head's)."""
    maps = backbone.encode_image_maps(images)
    return [maps.stages[1], maps.stages[2], maps.stages[3], maps.dense_pool]


class MapPacking:
    """Maps of different shapes as one ``[B, N]`` tensor per batch (what the feature cache keeps),
    and back; the shapes are remembered per image size."""

    def __init__(self) -> None:
        self.shapes: dict[tuple[int, ...], list[torch.Size]] = {}

    def pack(self, maps: Sequence[torch.Tensor], image_size: tuple[int, ...]) -> torch.Tensor:
        self.shapes[tuple(image_size)] = [m.shape[1:] for m in maps]
        return torch.cat([m.flatten(1) for m in maps], dim=1)

    def unpack(self, packed: torch.Tensor, image_size: tuple[int, ...]) -> list[torch.Tensor]:
        shapes = self.shapes[tuple(image_size)]
        sizes = [s.numel() for s in shapes]
        return [part.reshape(len(packed), *shape) for part, shape in zip(packed.split(sizes, dim=1), shapes)]


def refuse_visual_prompts(learner_name: str, uses_image_tower: bool) -> None:
    """CRIS's image tower is a ResNet: visual and multimodal prompt strategies (VPT, MaPLe, ...)
    need a ViT's tokens."""
    if uses_image_tower:
        raise ValueError(f"the {learner_name} prompt puts prompts into a ViT image tower; CRIS's image tower is a "
                         "ResNet: use a text prompt learner (CoOp, CoCoOp, KgCoOp, zero-shot)")


def prompt_text_tokens(captured: Sequence[TextTokens], index: torch.Tensor, n_prompts: int,
                       per_image: bool) -> TextTokens:
    """Each image's prompt's word features from the one text pass the learner made inside
    :meth:`~vlprompt.backbones.Backbone.capture_text_tokens`: ``index`` is each image's prompt
    among the learner's ``n_prompts``; ``per_image``: the learner encoded ``B x n_prompts``
    prompts (CoCoOp: one set per image), else ``n_prompts``."""
    if len(captured) != 1:
        raise ValueError(f"the prompt learner encoded its text in {len(captured)} passes (a template ensemble?); CRIS "
                         "needs one text per prompt, from one pass")
    tokens = captured[0]
    n = len(index)
    expected = n_prompts * (n if per_image else 1)
    if tokens.state.shape[0] != expected:
        raise ValueError(f"the learner's last text pass encoded {tokens.state.shape[0]} texts for {n_prompts} prompts "
                         f"(a template ensemble?); CRIS needs one text per prompt{' and image' if per_image else ''}")
    rows = torch.arange(n, device=index.device) * n_prompts + index if per_image else index
    return TextTokens(tokens.words[rows], tokens.padding[rows], tokens.state[rows])


def _load_cris_last_layer(path: Path, vis_dim: int) -> CRISLastLayer:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("head") != CRISLastLayer.kind:
        raise ValueError(f"{path} holds a new last layer for a {meta.get('head', 'CLIPSeg-style')} head, not CRIS's")
    if int(meta["vis_dim"]) != vis_dim:
        raise ValueError(f"{path} was trained on a CRIS decoder {meta['vis_dim']} wide; this one is {vis_dim}")
    layer = CRISLastLayer(vis_dim, int(meta["kernel_size"]), width=int(meta["width"]))
    layer.load_state_dict(load_file(str(path)))
    return layer


def cris_last_layer(vis_dim: int, init_prompt: str | None, settings: LastLayerSettings | None) -> CRISLastLayer | None:
    """CRIS's new last layer a segmenter starts from: the one saved with ``init_prompt``, else a
    new one from ``settings`` (TuneVLSeg mixes CRIS's by a ratio only), else none."""
    from vlprompt.zoo import prompt_file

    saved = prompt_file(init_prompt, LAST_LAYER_NAME)
    if saved is not None:
        log.info("init_prompt %s brings its trained new last layer", init_prompt)
        return _load_cris_last_layer(saved, vis_dim)
    if settings is None:
        return None
    if settings.mix != "ratio":
        raise ValueError(f"new_last_layer_mix={settings.mix!r}: TuneVLSeg mixes CRIS's new last layer by its ratio only")
    return CRISLastLayer(vis_dim, settings.kernel_size, settings.residual_ratio)
