"""Evaluation: metrics tables (seeds, base/novel/HM), plots, the few-shot transfer runner."""

from vlprompt.eval.plots import plot_accuracy_vs_shots
from vlprompt.eval.tables import Result, base_novel_table, harmonic_mean, shots_table, summarise, write_csv

__all__ = ["Result", "base_novel_table", "harmonic_mean", "plot_accuracy_vs_shots", "shots_table", "summarise", "write_csv"]
