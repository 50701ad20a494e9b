"""LightningModules: training and evaluation procedures, generic over prompt learners, and the
small pieces they are made of (scoring, image-feature cache, metrics, prompt initialisation,
callbacks), reusable by other procedures without subclassing a classifier."""

from vlprompt.methods.classifier import PromptClassifier, warmup_cosine
from vlprompt.methods.features import ImageFeatureCache
from vlprompt.methods.metrics import ClassCounts, UnreadableImages
from vlprompt.methods.prompt_averaging import GaussianPromptAggregation, gaussian_epoch_weights
from vlprompt.methods.prompt_init import load_initial_prompt
from vlprompt.methods.random_state import RandomStateCheckpoint
from vlprompt.methods.scoring import prompt_logits
from vlprompt.methods.tta import DiffTPT, Episode, TestTimePromptTuning

__all__ = [
    "ClassCounts",
    "DiffTPT",
    "Episode",
    "GaussianPromptAggregation",
    "ImageFeatureCache",
    "PromptClassifier",
    "RandomStateCheckpoint",
    "TestTimePromptTuning",
    "UnreadableImages",
    "gaussian_epoch_weights",
    "load_initial_prompt",
    "prompt_logits",
    "warmup_cosine",
]
