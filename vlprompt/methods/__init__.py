"""LightningModules: training and evaluation procedures, generic over prompt learners."""

from vlprompt.methods.classifier import PromptClassifier, warmup_cosine

__all__ = ["PromptClassifier", "warmup_cosine"]
