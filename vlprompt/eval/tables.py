"""Result tables: mean and spread over seeds, base / novel / harmonic mean, CSV and Markdown."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Result", "base_novel_table", "harmonic_mean", "read_csv", "shots_table", "summarise", "multitask_table",
           "transfer_table", "write_csv"]


@dataclass(frozen=True)
class Result:
    """One evaluation: ``method`` trained with ``shots`` per class and ``seed`` (zero-shot: 0
    shots), tested on ``setting`` (``all``, ``base`` or ``novel`` classes of the source data, or
    ``transfer`` for the source and target datasets of a cross-dataset / domain-generalisation
    protocol) of ``dataset`` (``source``, or the target's name). ``accuracy`` in %."""

    method: str
    shots: int
    seed: int
    setting: str
    accuracy: float
    dataset: str = "source"


def harmonic_mean(base: float, novel: float) -> float:
    """Harmonic mean of base and novel accuracy (the base-to-novel summary of CoCoOp)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def summarise(results: Iterable[Result]) -> dict[tuple[str, int, str], tuple[float, float, int]]:
    """``(method, shots, setting) -> (mean, std, n_seeds)`` over seeds."""
    groups: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for r in results:
        groups[(r.method, r.shots, r.setting)].append(r.accuracy)
    return {k: _seed_stats(v) for k, v in groups.items()}


def _seed_stats(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.1f}" if n < 2 else f"{mean:.1f} ± {std:.1f}"


def shots_table(results: Sequence[Result], methods: Sequence[str]) -> str:
    """Markdown table of accuracy on all classes: one row per method, one column per shot count."""
    stats = summarise(r for r in results if r.setting == "all")
    shots = sorted({k[1] for k in stats if k[1] > 0})
    lines = ["| method | " + " | ".join(f"{s}-shot" for s in shots) + " |", "|---" * (len(shots) + 1) + "|"]
    for m in methods:
        cells = []
        for s in shots:
            key = (m, 0 if m == "zeroshot" else s, "all")
            cells.append(_fmt(*stats[key]) if key in stats else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def base_novel_table(results: Sequence[Result], methods: Sequence[str]) -> str:
    """Markdown table of base, novel and harmonic mean (of the seed-averaged accuracies)."""
    stats = summarise(r for r in results if r.setting in ("base", "novel"))
    lines = ["| method | base | novel | HM |", "|---|---|---|---|"]
    for m in methods:
        row = {setting: v for (method, _, setting), v in stats.items() if method == m}
        if "base" not in row or "novel" not in row:
            continue
        hm = harmonic_mean(row["base"][0], row["novel"][0])
        lines.append(f"| {m} | {_fmt(*row['base'])} | {_fmt(*row['novel'])} | {hm:.1f} |")
    return "\n".join(lines)


def transfer_table(results: Sequence[Result], methods: Sequence[str], targets: Sequence[str]) -> str:
    """Markdown table of a cross-dataset or domain-generalisation protocol, as in the CoCoOp and
    MaPLe papers: accuracy on the source, on each target, and the mean over the targets (the mean
    of each seed's target mean, with its spread over seeds)."""
    rows: dict[tuple[str, str], list[float]] = defaultdict(list)
    per_seed: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for r in results:
        if r.setting == "transfer":
            rows[(r.method, r.dataset)].append(r.accuracy)
            per_seed[(r.method, r.seed)][r.dataset] = r.accuracy
    lines = ["| method | source | " + " | ".join(targets) + " | target mean |", "|---" * (len(targets) + 3) + "|"]
    for m in methods:
        if (m, "source") not in rows and not any((m, t) in rows for t in targets):
            continue
        cells = [_fmt(*_seed_stats(rows[(m, d)])) if (m, d) in rows else "" for d in ("source", *targets)]
        means = [statistics.fmean(v[t] for t in targets) for (method, _), v in per_seed.items()
                 if method == m and all(t in v for t in targets)]
        cells.append(_fmt(*_seed_stats(means)) if means else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def multitask_table(results: Sequence[Result], methods: Sequence[str], targets: Sequence[str], shots: int) -> str:
    """Markdown table of multitask prompt tuning on target tasks at ``shots``: one row per method and
    way of using it (``setting``: zero-shot, single, source, mvlpt-init, multitask), one column per
    target task (``dataset``) and the mean over the targets (mean of each seed's mean, with its spread)."""
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    per_seed: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    for r in results:
        if r.shots in (0, shots):  # zero-shot and the untuned source prompt belong to every shot count
            cells[(r.method, r.setting, r.dataset)].append(r.accuracy)
            per_seed[(r.method, r.setting, r.seed)][r.dataset] = r.accuracy
    lines = ["| method | prompt | " + " | ".join(targets) + " | mean |", "|---" * (len(targets) + 3) + "|"]
    rows = [("zeroshot", "zero-shot")] + [(m, v) for m in methods for v in ("single", "source", "mvlpt-init", "multitask")]
    for method, setting in rows:
        if not any((method, setting, t) in cells for t in targets):
            continue
        row = [_fmt(*_seed_stats(cells[(method, setting, t)])) if (method, setting, t) in cells else "" for t in targets]
        means = [statistics.fmean(v[t] for t in targets) for (m, s, _), v in per_seed.items()
                 if (m, s) == (method, setting) and all(t in v for t in targets)]
        row.append(_fmt(*_seed_stats(means)) if means else "")
        lines.append(f"| {'' if method == 'zeroshot' else method} | {setting} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_csv(results: Sequence[Result], path: str | Path) -> Path:
    """Write one row per result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "shots", "seed", "setting", "dataset", "accuracy"])
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    return path


def read_csv(path: str | Path) -> list[Result]:
    """Read what :func:`write_csv` wrote."""
    with Path(path).open(newline="") as fh:
        return [
            Result(r["method"], int(r["shots"]), int(r["seed"]), r["setting"], float(r["accuracy"]), r.get("dataset") or "source")
            for r in csv.DictReader(fh)
        ]
