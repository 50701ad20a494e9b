"""LightningModules: training and evaluation procedures, generic over prompt learners."""

from vlprompt.methods.classifier import PromptClassifier, warmup_cosine
from vlprompt.methods.tta import DiffTPT, Episode, TestTimePromptTuning

__all__ = ["DiffTPT", "Episode", "PromptClassifier", "TestTimePromptTuning", "warmup_cosine"]
