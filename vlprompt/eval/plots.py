"""Pictures of results: accuracy against the number of shots; the views of test-time tuning; the
task x task transfer matrix of a transferability study."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlprompt.eval.tables import Result, summarise

__all__ = ["plot_accuracy_vs_shots", "plot_transfer_matrix", "plot_views"]


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
    return _save(fig, path)


def plot_views(views: torch.Tensor, preprocess_cfg: dict[str, Any], kept: Sequence[int], n_conventional: int,
               title: str, path: str | Path, max_views: int = 32) -> Path:
    """A grid of the views of one test image (normalised tensors ``[N, 3, H, W]``, the original
    first): the views the entropy loss used are outlined in green, diffusion-generated views
    (index ``>= n_conventional``) are labelled "gen"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Show the original, then kept views first, so the picture says what drove the update.
    kept_set = set(kept)
    order = [0] + sorted(range(1, len(views)), key=lambda i: (i not in kept_set, i))
    order = order[:max_views]
    mean = torch.tensor(preprocess_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"]).view(3, 1, 1)
    cols = min(8, len(order))
    rows = (len(order) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows + 0.4), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order):
        image = (views[i].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        ax.imshow(image)
        label = "original" if i == 0 else ("gen" if i >= n_conventional else "aug") + f" {i}"
        ax.set_title(label, fontsize=6, color="green" if i in kept_set else "black")
        if i in kept_set:
            ax.add_patch(matplotlib.patches.Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False,
                                                      edgecolor="limegreen", linewidth=3))
    fig.suptitle(title + f"\n{len(kept_set)} of {len(views)} views kept (green)", fontsize=7)
    return _save(fig, path)


def plot_transfer_matrix(gains: Sequence[Sequence[float]], sources: Sequence[str], targets: Sequence[str],
                         path: str | Path, title: str = "Transfer gain (points)") -> Path:
    """Heat map of ``gains[s][t]`` (what tuning on source ``s`` adds on target ``t``, in accuracy
    points), diverging around 0, each cell labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.tensor([[float(v) for v in row] for row in gains])
    limit = max(1.0, float(values.abs().max()))
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(targets), 1.0 + 0.6 * len(sources)), dpi=120)
    image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(targets)), labels=list(targets), rotation=45, ha="right")
    ax.set_yticks(range(len(sources)), labels=list(sources))
    ax.set_xlabel("target task")
    ax.set_ylabel("source task")
    for i in range(len(sources)):
        for j in range(len(targets)):
            ax.text(j, i, f"{values[i, j]:+.1f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(values[i, j]) > 0.6 * limit else "black")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title("\n".join(textwrap.wrap(title, 48)), fontsize=9)
    return _save(fig, path)
