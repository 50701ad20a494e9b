"""K-shot sampling (seeded, saved, reused) and base / novel class subsets."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import math
import random
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from vlprompt.data.images import UnreadableImageError, load_rgb
from vlprompt.data.samples import Sample

__all__ = [
    "ClassSubset",
    "FewShotDrawMismatch",
    "default_cache_dir",
    "load_or_sample_few_shot",
    "sample_few_shot",
    "samples_digest",
    "subset_classes",
]

log = logging.getLogger(__name__)

ClassSubset = Literal["all", "base", "novel"]


def default_cache_dir() -> Path:
    """Where vlprompt keeps what it derives from a user's data (few-shot draws): never inside
    the data folder. ``$VLPROMPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vlprompt``, else
    ``~/.cache/vlprompt``."""
    if os.environ.get("VLPROMPT_CACHE_DIR"):
        return Path(os.environ["VLPROMPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vlprompt"


def samples_digest(samples: Sequence[Sample]) -> str:
    """Hash of a sample list (paths and labels, in order)."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(f"{s.path}\0{s.label}\n".encode())
    return digest.hexdigest()


def _readable(path: str) -> bool:
    try:
        load_rgb(path)
        return True
    except UnreadableImageError as err:
        log.warning("not drawing %s as a shot: %s", path, err)
        return False


def sample_few_shot(samples: Sequence[Sample], shots: int, seed: int, *, check_readable: bool = False) -> list[Sample]:
    """Up to ``shots`` samples per class, drawn with ``seed``; all samples when ``shots < 1``.

    Classes with fewer samples than ``shots`` keep all of theirs (logged). With
    ``check_readable``, a drawn image that cannot be decoded is replaced by a further seeded draw
    from the rest of its class, so a bad file is never a shot; when every image is readable the
    draw is the same as without the check."""
    if shots < 1:
        return list(samples)
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    rng = random.Random(seed)
    picked: list[Sample] = []
    short, replaced = [], 0
    for label in sorted(by_label):
        pool = by_label[label]
        if len(pool) < shots:
            short.append(label)
            chosen = list(pool)
        else:
            chosen = rng.sample(pool, shots)
        if check_readable:
            good = [s for s in chosen if _readable(s.path)]
            rest = [s for s in pool if s not in set(chosen)]
            spare = random.Random(f"{seed}-{label}")
            spare.shuffle(rest)
            while len(good) < len(chosen) and rest:
                candidate = rest.pop()
                if _readable(candidate.path):
                    good.append(candidate)
                    replaced += 1
            chosen = good
        picked += chosen
    if short:
        log.warning("%d classes have fewer than %d samples; using all of theirs (labels %s)", len(short), shots, short[:10])
    if replaced:
        log.warning("replaced %d unreadable images in the %d-shot draw by readable ones", replaced, shots)
    return picked


class FewShotDrawMismatch(ValueError):
    """A saved few-shot draw was made for other data (other classes or samples)."""


def load_or_sample_few_shot(
    samples: Sequence[Sample],
    shots: int,
    seed: int,
    cache_file: str | Path | None,
    split: str,
    classnames: Sequence[str] = (),
) -> list[Sample]:
    """Sample ``shots`` per class (never an unreadable image), or reuse the draw saved in
    ``cache_file`` (JSON) so every run with the same data, shots and seed trains on the same images.

    The file records the class names and a hash of the split's samples; a draw saved for other
    data is never reused: :class:`FewShotDrawMismatch` says what changed (the file is left alone)."""
    if shots < 1:
        return list(samples)
    digest = samples_digest(samples)
    data: dict = {"shots": shots, "seed": seed, "classnames": list(classnames)}
    if cache_file is not None and Path(cache_file).is_file():
        data = json.loads(Path(cache_file).read_text())
        entry = data.get(split)
        if isinstance(entry, dict):
            changed = []
            if data.get("classnames") != list(classnames):
                changed.append(f"the classes ({len(data.get('classnames') or [])} then, {len(classnames)} now)")
            if entry.get("samples_sha256") != digest:
                changed.append(f"the {split} images")
            if changed:
                raise FewShotDrawMismatch(
                    f"the saved {shots}-shot draw {cache_file} was made for other data: {' and '.join(changed)} "
                    "changed since. Delete it to draw again, or pass another fewshot_dir"
                )
            known = {s.path: s for s in samples}
            log.info("reusing the %d-shot %s draw (seed %d) from %s", shots, split, seed, cache_file)
            return [known[p] for p in entry["paths"]]
    picked = sample_few_shot(samples, shots, seed, check_readable=True)
    if cache_file is not None:
        cache_file = Path(cache_file)
        data[split] = {"samples_sha256": digest, "paths": [s.path for s in picked]}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            # A staging file of this process's own, moved into place at once: DDP ranks draw the
            # same shots and may save them at the same moment, and a reader never sees half a file.
            handle, tmp = tempfile.mkstemp(prefix=f".{cache_file.name}.", dir=cache_file.parent)
            with os.fdopen(handle, "w") as f:
                f.write(json.dumps(data, indent=1))
            os.replace(tmp, cache_file)
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
