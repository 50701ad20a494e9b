"""Pictures of results: accuracy against the number of shots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlprompt.eval.tables import Result, summarise

__all__ = ["plot_accuracy_vs_shots"]


def plot_accuracy_vs_shots(results: Sequence[Result], path: str | Path, title: str = "Few-shot accuracy") -> Path:
    """Mean accuracy (error bars: std over seeds) against shots per class, one line per method;
    zero-shot as a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(r for r in results if r.setting == "all")
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    methods = sorted({m for m, _, _ in stats if m != "zeroshot"})
    shots_all = sorted({s for m, s, _ in stats if s > 0})
    for method in methods:
        points = sorted((s, v) for (m, s, _), v in stats.items() if m == method)
        xs = [s for s, _ in points]
        ax.errorbar(xs, [v[0] for _, v in points], yerr=[v[1] for _, v in points], marker="o", capsize=3, label=method)
    if ("zeroshot", 0, "all") in stats:
        ax.axhline(stats[("zeroshot", 0, "all")][0], color="grey", linestyle="--", label="zero-shot")
    if shots_all:
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots_all, [str(s) for s in shots_all])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
