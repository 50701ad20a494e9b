"""Meta-learning parts (GRAM): tasks from unlabelled image-text pairs and the gradient regulator."""

from vlprompt.meta.episodes import Episode, EpisodeSampler, PairHierarchy, cluster_pairs
from vlprompt.meta.regulator import GradientRegulator, load_regulator, save_regulator

__all__ = ["Episode", "EpisodeSampler", "GradientRegulator", "PairHierarchy", "cluster_pairs", "load_regulator",
           "save_regulator"]
