"""K-shot sampling (seeded, saved, reused) and base / novel class subsets."""

from __future__ import annotations

import json
import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from vlprompt.data.sources import Sample

__all__ = ["ClassSubset", "sample_few_shot", "load_or_sample_few_shot", "subset_classes"]

log = logging.getLogger(__name__)

ClassSubset = Literal["all", "base", "novel"]


def sample_few_shot(samples: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """Up to ``shots`` samples per class, drawn with ``seed``; all samples when ``shots < 1``.

    Classes with fewer samples than ``shots`` keep all of theirs (logged)."""
    if shots < 1:
        return list(samples)
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    rng = random.Random(seed)
    picked: list[Sample] = []
    short = []
    for label in sorted(by_label):
        pool = by_label[label]
        if len(pool) < shots:
            short.append(label)
            picked += pool
        else:
            picked += rng.sample(pool, shots)
    if short:
        log.warning("%d classes have fewer than %d samples; using all of theirs (labels %s)", len(short), shots, short[:10])
    return picked


def load_or_sample_few_shot(
    samples: Sequence[Sample], shots: int, seed: int, cache_file: str | Path | None, split: str
) -> list[Sample]:
    """Sample ``shots`` per class, or reuse the draw saved in ``cache_file`` (JSON) so every run
    with the same shots and seed trains on the same images."""
    if shots < 1:
        return list(samples)
    if cache_file is not None and Path(cache_file).is_file():
        saved = json.loads(Path(cache_file).read_text())
        known = {s.path: s for s in samples}
        if split in saved:
            if all(p in known for p in saved[split]):
                log.info("reusing the %d-shot %s draw (seed %d) from %s", shots, split, seed, cache_file)
                return [known[p] for p in saved[split]]
            log.warning("few-shot draw %s no longer matches the data; drawing again", cache_file)
    picked = sample_few_shot(samples, shots, seed)
    if cache_file is not None:
        cache_file = Path(cache_file)
        data = json.loads(cache_file.read_text()) if cache_file.is_file() else {"shots": shots, "seed": seed}
        data[split] = [s.path for s in picked]
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(data, indent=1))
        except OSError as err:
            log.warning("could not save the few-shot draw to %s (%s); it will be drawn again next time", cache_file, err)
    return picked


def subset_classes(
    samples: Sequence[Sample], classnames: Sequence[str], subset: ClassSubset
) -> tuple[list[Sample], list[str]]:
    """Keep the base (first ``ceil(n/2)`` labels) or novel (the rest) classes, relabelled from
    0, as in the base-to-novel protocol of CoCoOp."""
    if subset == "all":
        return list(samples), list(classnames)
    if subset not in ("base", "novel"):
        raise ValueError(f"subset must be all, base or novel, not {subset!r}")
    n_base = math.ceil(len(classnames) / 2)
    keep = range(n_base) if subset == "base" else range(n_base, len(classnames))
    relabel = {old: new for new, old in enumerate(keep)}
    names = [classnames[i] for i in keep]
    return [Sample(s.path, relabel[s.label], s.classname) for s in samples if s.label in relabel], names
