"""LightningModules: training and evaluation procedures, generic over prompt learners, and the
small parts they are made of, reusable by other procedures without subclassing a classifier.

* :class:`PromptModule` (``module.py``): the frozen backbone and the prompt learner, optimisation,
  checkpoints that hold the prompt only, unreadable images, seeded training data.
* :class:`PromptClassifier` (``classifier.py``): classification on one task or several (MVLPT);
  :class:`MultiTaskPromptClassifier` is the same class reporting each task's score.
  :class:`PromptSegmenter`, :class:`TestTimePromptTuning` / :class:`DiffTPT` and
  :class:`GRAMMetaLearner` compose the parts they need and inherit no classification state.
* Parts: ``feature_source.py`` (image features from the tower, the cache ``features.py`` or the
  bank ``feature_bank.py``), ``tasks.py`` (task masking; single-task is one task), ``reports.py``
  and ``metrics.py`` (what is measured and logged), ``scoring.py`` (logits), ``optimization.py``,
  ``checkpoints.py``, ``unreadable.py``, ``data_link.py`` (the data, met through
  :mod:`vlprompt.data.protocol`), ``prompt_init.py``, ``random_state.py``; callbacks for
  procedures (``prompt_averaging.py``, ``gram.py``'s :class:`GradientRegulation`).

Names are imported on first use (PEP 562), so ``from vlprompt.methods import PromptClassifier``
does not import test-time tuning and its view machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module defining it
_EXPORTS = {
    "PromptClassifier": "classifier",
    "warmup_cosine": "optimization",
    "PromptModule": "module",
    "MultiTaskPromptClassifier": "multitask",
    "PromptSegmenter": "segmentation",
    "GRAMMetaLearner": "gram",
    "GradientRegulation": "gram",
    "task_scores": "tasks",
    "TaskScorer": "tasks",
    "ImageFeatureSource": "feature_source",
    "ImageFeatureCache": "features",
    "ClassCounts": "metrics",
    "UnreadableImages": "unreadable",
    "GaussianPromptAggregation": "prompt_averaging",
    "gaussian_epoch_weights": "prompt_averaging",
    "load_initial_prompt": "prompt_init",
    "RandomStateCheckpoint": "random_state",
    "prompt_logits": "scoring",
    "DiffTPT": "tta",
    "Episode": "tta",
    "TestTimePromptTuning": "tta",
}

__all__ = [
    "ClassCounts",
    "DiffTPT",
    "Episode",
    "GRAMMetaLearner",
    "GaussianPromptAggregation",
    "GradientRegulation",
    "ImageFeatureCache",
    "ImageFeatureSource",
    "MultiTaskPromptClassifier",
    "PromptClassifier",
    "PromptModule",
    "PromptSegmenter",
    "RandomStateCheckpoint",
    "TaskScorer",
    "TestTimePromptTuning",
    "UnreadableImages",
    "gaussian_epoch_weights",
    "load_initial_prompt",
    "prompt_logits",
    "task_scores",
    "warmup_cosine",
]

if TYPE_CHECKING:
    from vlprompt.methods.classifier import PromptClassifier
    from vlprompt.methods.feature_source import ImageFeatureSource
    from vlprompt.methods.features import ImageFeatureCache
    from vlprompt.methods.gram import GradientRegulation, GRAMMetaLearner
    from vlprompt.methods.metrics import ClassCounts
    from vlprompt.methods.module import PromptModule
    from vlprompt.methods.multitask import MultiTaskPromptClassifier
    from vlprompt.methods.optimization import warmup_cosine
    from vlprompt.methods.prompt_averaging import (
        GaussianPromptAggregation,
        gaussian_epoch_weights,
    )
    from vlprompt.methods.prompt_init import load_initial_prompt
    from vlprompt.methods.random_state import RandomStateCheckpoint
    from vlprompt.methods.scoring import prompt_logits
    from vlprompt.methods.segmentation import PromptSegmenter
    from vlprompt.methods.tasks import TaskScorer, task_scores
    from vlprompt.methods.tta import DiffTPT, Episode, TestTimePromptTuning
    from vlprompt.methods.unreadable import UnreadableImages


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
