"""The GRAM demo (``vlprompt demo --config shapeworld_gram``): the same few-shot evaluation in
several settings (held-out classes, a shifted domain), each method from its usual initialisation or
from a GRAM meta-prompt, with and without the gradient regulator; one table of accuracy over shots.

The evaluation YAML is a few-shot one (:class:`~vlprompt.apps.fewshot.EvaluationConfig`) with a
``settings:`` map of name -> data module; each setting replaces ``data``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from vlprompt.apps.fewshot import EvaluationConfig, apply_overrides, run_fewshot_eval
from vlprompt.apps.runner import runner_section, typed_config
from vlprompt.eval.tables import Result, summarise

__all__ = ["format_gram_table", "load_settings", "run_settings", "setting_configs"]


def load_settings(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The ``settings`` of an evaluation YAML and the rest of it."""
    raw = runner_section(path, "gram")
    settings = raw.pop("settings", None)
    if not isinstance(settings, dict) or not settings:
        raise ValueError(f"{path}: `settings:` must map setting names to data modules ({{class_path, init_args}})")
    return settings, raw


def setting_configs(path: str | Path, args: argparse.Namespace | None = None,
                    parser: argparse.ArgumentParser | None = None) -> dict[str, EvaluationConfig]:
    """The few-shot evaluation of each setting of ``path``, typed, with the command line's
    overrides (``args``: dotted ``overrides`` and :func:`~vlprompt.apps.fewshot.apply_overrides`'s)."""
    settings, raw = load_settings(path)
    configs = {}
    for name, data in settings.items():
        cfg = typed_config(EvaluationConfig, {**raw, "data": data}, path, getattr(args, "overrides", ()))
        if args is not None:
            apply_overrides(cfg, args, parser)
        configs[name] = cfg
    return configs


def run_settings(path: str | Path, output_dir: Path, args: argparse.Namespace | None = None,
                 parser: argparse.ArgumentParser | None = None) -> dict[str, list[Result]]:
    """Run the few-shot evaluation of ``path`` once per setting (results in ``output_dir/<setting>``)."""
    results = {}
    for name, cfg in setting_configs(path, args, parser).items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        results[name] = run_fewshot_eval(cfg, output_dir / slug)
    return results


def format_gram_table(results: dict[str, list[Result]]) -> str:
    """Accuracy (%) per setting, method and shot count, mean ± std over seeds."""
    lines = []
    for name, rows in results.items():
        stats = summarise(rows)
        shots = sorted({s for (m, s, setting) in stats if m != "zeroshot" and setting == "all"})
        methods = list(dict.fromkeys(m for m, _, setting in stats if setting == "all"))
        lines.append(f"{name}:")
        lines.append(f"  {'method':<16}" + "".join(f"{f'{s}-shot':>15}" for s in shots))
        for method in sorted(methods, key=lambda m: m != "zeroshot"):
            cells = []
            for s in shots:
                key = (method, 0 if method == "zeroshot" else s, "all")
                mean, std, n = stats.get(key, (float("nan"), 0.0, 0))
                cells.append(f"{mean:6.1f}" + (f" ± {std:4.1f}" if n > 1 else "       "))
            lines.append(f"  {'zero-shot' if method == 'zeroshot' else method:<16}" + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)
