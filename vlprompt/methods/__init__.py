"""LightningModules: training and evaluation procedures, generic over prompt learners."""

from vlprompt.methods.classifier import PromptClassifier, warmup_cosine
from vlprompt.methods.tta import TestTimePromptTuning

__all__ = ["PromptClassifier", "TestTimePromptTuning", "warmup_cosine"]
