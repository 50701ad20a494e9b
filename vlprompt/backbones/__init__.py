"""Encoders behind the prompt-learning API. The only package that knows encoder internals."""

from vlprompt.backbones.base import Backbone, BackboneMismatchError, check_backbone_identity
from vlprompt.backbones.hf_clip import HFCLIPBackbone
from vlprompt.backbones.open_clip import OpenCLIPBackbone
from vlprompt.backbones.timm import TimmBackbone
from vlprompt.backbones.vision import PromptPlacement

__all__ = [
    "Backbone",
    "BackboneMismatchError",
    "HFCLIPBackbone",
    "OpenCLIPBackbone",
    "PromptPlacement",
    "TimmBackbone",
    "check_backbone_identity",
]
