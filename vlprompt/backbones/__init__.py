"""Encoders behind the prompt-learning API. The only package that knows encoder internals.

Each family (open_clip, Hugging Face CLIP/CLIPSeg, timm) lives in its own module and registers
itself there (:func:`register_backbone`); importing the module is what registers it.
"""

from vlprompt.backbones.base import Backbone, BackboneMismatchError, TextTokens, check_backbone_identity
from vlprompt.backbones.hf_clip import HFCLIPBackbone
from vlprompt.backbones.open_clip import OpenCLIPBackbone
from vlprompt.backbones.registry import backbone_families, backbone_from_identity, load_backbone, register_backbone
from vlprompt.backbones.resnet import ImageMaps
from vlprompt.backbones.text import TextTower
from vlprompt.backbones.timm import TimmBackbone
from vlprompt.backbones.vision import PromptPlacement

__all__ = [
    "load_backbone",
    "Backbone",
    "BackboneMismatchError",
    "HFCLIPBackbone",
    "ImageMaps",
    "OpenCLIPBackbone",
    "PromptPlacement",
    "TextTokens",
    "TextTower",
    "TimmBackbone",
    "backbone_families",
    "backbone_from_identity",
    "check_backbone_identity",
    "register_backbone",
]
