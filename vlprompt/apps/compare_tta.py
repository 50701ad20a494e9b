"""Comparison of test-time methods on one dataset (the TTA demo): zero-shot (the starting prompt),
TPT, DiffTPT, ... with accuracy and time per image."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlprompt.apps.tta import main

__all__ = ["compare_tta", "format_comparison"]

log = logging.getLogger(__name__)


def compare_tta(config: dict[str, Any], output_dir: str | Path, extra_args: list[str] = ()) -> dict[str, dict[str, Any]]:
    """Run every method of a comparison config on the same data and return their summaries.

    ``config`` has ``backbone`` (``{class_path, init_args}``), ``data`` (``{class_path,
    init_args}``), ``methods`` (name -> ``{class_path, init_args}`` of a test-time method) and
    optionally ``trainer`` (trainer options). The first method's starting prompt gives the
    zero-shot accuracy.
    """
    unknown = set(config) - {"backbone", "data", "methods", "trainer", "pictures"}
    if unknown:
        raise ValueError(f"unknown keys in the TTA comparison config: {sorted(unknown)}")
    output_dir = Path(output_dir)
    summaries = {}
    for name, method in config["methods"].items():
        model = {"class_path": method["class_path"],
                 "init_args": {"backbone": config["backbone"], **(method.get("init_args") or {})}}
        argv = ["--model", json.dumps(model), "--data", json.dumps(config["data"]), "--out", str(output_dir / name),
                "--pictures", str(config.get("pictures", 2))]
        for key, value in (config.get("trainer") or {}).items():
            argv += [f"--trainer.{key}", json.dumps(value) if not isinstance(value, str) else value]
        log.info("test-time tuning with %s", name)
        summaries[name] = main(argv + list(extra_args))
    return summaries


def format_comparison(summaries: dict[str, dict[str, Any]]) -> str:
    """A table: zero-shot (the starting prompt) and each method's accuracy and time per image."""
    first = next(iter(summaries.values()))
    lines = [f"{'method':<10} {'accuracy':>9} {'s/image':>8}", f"{'zero-shot':<10} {first.get('start_accuracy', float('nan')):>8.1f}% {'':>8}"]
    for name, summary in summaries.items():
        lines.append(f"{name:<10} {summary.get('accuracy', float('nan')):>8.1f}% {summary['seconds_per_image']:>8.3f}")
    return "\n".join(lines)
