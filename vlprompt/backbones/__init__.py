"""Encoders behind the prompt-learning API. The only package that knows encoder internals."""

from vlprompt.backbones.base import Backbone, BackboneMismatchError, check_backbone_identity
from vlprompt.backbones.hf_clip import HFCLIPBackbone
from vlprompt.backbones.open_clip import OpenCLIPBackbone
from vlprompt.backbones.timm import TimmBackbone
from vlprompt.backbones.vision import PromptPlacement

__all__ = [
    "load_backbone",
    "Backbone",
    "BackboneMismatchError",
    "HFCLIPBackbone",
    "OpenCLIPBackbone",
    "PromptPlacement",
    "TimmBackbone",
    "check_backbone_identity",
]


def load_backbone(name: str, pretrained: str | None = None) -> Backbone:
    """The backbone ``name`` names: ``hf:ID_OR_FOLDER`` for a transformers CLIP/CLIPSeg model
    (:class:`HFCLIPBackbone`), anything else an open_clip model (:class:`OpenCLIPBackbone`: a model
    name, ``local-dir:FOLDER`` or ``zoo:NAME``) with its ``pretrained`` tag or checkpoint."""
    if name.startswith("hf:"):
        if pretrained:
            raise ValueError(f"{name}: a transformers model brings its own weights; drop pretrained={pretrained!r}")
        return HFCLIPBackbone(name)
    return OpenCLIPBackbone(name, pretrained)
