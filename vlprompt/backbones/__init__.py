"""Encoders behind the prompt-learning API. The only package that knows encoder internals."""

from vlprompt.backbones.base import Backbone, BackboneMismatchError, check_backbone_identity
from vlprompt.backbones.open_clip import OpenCLIPBackbone

__all__ = ["Backbone", "BackboneMismatchError", "OpenCLIPBackbone", "check_backbone_identity"]
