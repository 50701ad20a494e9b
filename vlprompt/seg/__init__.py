"""Segmentation with vision-language models: metrics (Dice, IoU per image and dataset-wide), losses,
and heads over a prompted backbone."""

from vlprompt.seg.metrics import SegmentationScores, binary_scores

__all__ = ["SegmentationScores", "binary_scores"]
