"""Segmentation with vision-language models: metrics (Dice, IoU per image and dataset-wide), losses,
and heads over a prompted backbone (CLIPSeg's, vlprompt's CLIPSeg-style decoder, CRIS's)."""

from vlprompt.seg.clipseg import HFCLIPSegHead
from vlprompt.seg.cris import CRISHead, CRISLastLayer
from vlprompt.seg.decoder import CLIPSegDecoder, default_extract_layers
from vlprompt.seg.metrics import SegmentationScores, binary_scores

__all__ = ["CLIPSegDecoder", "CRISHead", "CRISLastLayer", "DiceBCELoss", "HFCLIPSegHead", "SegmentationScores", "binary_scores", "default_extract_layers"]


def __getattr__(name: str):
    if name == "DiceBCELoss":  # imports MONAI, only when asked for
        from vlprompt.seg.losses import DiceBCELoss

        return DiceBCELoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
