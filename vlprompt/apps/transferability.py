"""Task transferability: which tasks help each other when a prompt learned on one is used on
another (the study behind MVLPT's task groups; Shen et al., WACV 2024, Sec. 5).

A prompt is tuned on every task in turn (the source) and used on every task (the target):

* ``finetune: false`` (default): the source prompt is tested on the target as it is, with the
  target's class names; the gain is over the hand-written zero-shot prompt.
* ``finetune: true``: the target is tuned with ``target_shots`` shots starting from the source
  prompt; the gain is over the same tuning from scratch.

Writes ``accuracy.csv`` and ``gain.csv`` (rows: source, columns: target), ``transfer.png`` (the
gain as a heat map) and ``groups.md``: target groups, the tasks that help each other both ways by
more than ``threshold`` points (connected components of that relation), ready to be tuned
together with ``vlprompt eval-multitask``.

The YAML (``configs/eval/shapeworld_transferability.yaml``)::

    backbone: {class_path: ..., init_args: {...}}
    tasks: {name: {class_path: ..., init_args: {...}}}   # every task is a source and a target
    method: {config: ../methods/mvlpt_coop.yaml, model: {...}, trainer: {max_epochs: 15}}
    shots: 16            # source tuning
    seed: 1
    finetune: false
    target_shots: 4      # with finetune
    threshold: 1.0       # points of gain, both ways, for two tasks to share a group
    zeroshot: {templates: "a photo of a {}."}
    trainer: {accelerator: cpu}
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from vlprompt.apps.commands import transferability_parser
from vlprompt.apps.runner import MethodRecipe, TaskRunner, config_text, method_recipe, prepare_output_dir, read_config, resolve_config_path
from vlprompt.eval.plots import plot_transfer_matrix

__all__ = ["TransferabilityConfig", "TransferabilityStudy", "load_transferability_config", "main", "run_transferability",
           "task_groups"]

log = logging.getLogger(__name__)


@dataclass
class TransferabilityConfig:
    """What to run; see the module docstring for the YAML form."""

    backbone: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    method: dict[str, Any]
    shots: int = 16
    seed: int = 1
    finetune: bool = False
    target_shots: int = 4
    threshold: float = 1.0
    zeroshot: dict[str, Any] = field(default_factory=lambda: {"templates": "photo"})
    trainer: dict[str, Any] = field(default_factory=dict)
    config_dir: Path | None = None

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise ValueError("a transferability study needs at least two tasks")
        if "config" not in self.method or set(self.method) - {"config", "model", "trainer"}:
            raise ValueError("method: give `config:` (a method YAML) and optionally `model:` and `trainer:`")

    def recipe(self) -> MethodRecipe:
        return method_recipe(self.method, self.config_dir)


def load_transferability_config(path: str | Path, overrides: Sequence[str] = ()) -> TransferabilityConfig:
    """Read a transferability YAML (unknown keys are an error)."""
    return read_config(TransferabilityConfig, path, "transferability", overrides=overrides)


def task_groups(gain: dict[str, dict[str, float]], threshold: float) -> list[list[str]]:
    """Groups of tasks that help each other: ``a`` and ``b`` are linked when the prompt of each
    raises the other's accuracy by more than ``threshold`` points; groups are the connected
    components of that relation (a task linked to none is a group of its own)."""
    names = list(gain)
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if gain[a][b] > threshold and gain[b][a] > threshold:
                parent[root(b)] = root(a)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(root(n), []).append(n)
    return sorted(groups.values(), key=lambda g: (-len(g), names.index(g[0])))


@dataclass
class TransferabilityStudy:
    """The outcome: ``accuracy[source][target]`` and ``gain[source][target]`` in %, the baseline of
    each target, and the proposed groups."""

    accuracy: dict[str, dict[str, float]]
    gain: dict[str, dict[str, float]]
    baseline: dict[str, float]
    groups: list[list[str]]


def _write_matrix(path: Path, matrix: dict[str, dict[str, float]]) -> None:
    targets = list(next(iter(matrix.values())))
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source \\ target", *targets])
        for source, row in matrix.items():
            writer.writerow([source, *(f"{row[t]:.2f}" for t in targets)])


def run_transferability(cfg: TransferabilityConfig, output_dir: str | Path, *, overwrite: bool = False) -> TransferabilityStudy:
    """Tune on every task, use each prompt on every task, write the matrices, heat map and groups."""
    output_dir = prepare_output_dir(output_dir, "gain.csv", overwrite)
    started = time.perf_counter()
    runner, recipe, names = TaskRunner(cfg.backbone, cfg.trainer), cfg.recipe(), list(cfg.tasks)
    test_data = {t: runner.data(cfg.tasks[t], -1, cfg.seed) for t in names}

    def tuned_on_target(target: str, init: str | None) -> float:
        dm = runner.data(cfg.tasks[target], cfg.target_shots, cfg.seed)
        return runner.test(runner.fit(recipe, dm, cfg.seed, init_prompt=init), test_data[target])

    if cfg.finetune:
        baseline = {t: tuned_on_target(t, None) for t in names}
    else:
        baseline = {t: runner.zeroshot(test_data[t], cfg.zeroshot.get("templates", "photo")) for t in names}
    accuracy: dict[str, dict[str, float]] = {}
    from tqdm.auto import tqdm

    for source in tqdm(names, desc="source tasks", unit="task"):
        model = runner.fit(recipe, runner.data(cfg.tasks[source], cfg.shots, cfg.seed), cfg.seed)
        prompt = model.save_prompt(output_dir / "prompts" / source, overwrite=True)
        accuracy[source] = {}
        for target in names:
            if cfg.finetune:
                accuracy[source][target] = tuned_on_target(target, str(prompt))
            else:  # the source prompt on the target's classes, as it is
                probe, _ = recipe.build(runner.backbone, test_data[target].classnames, init_prompt=str(prompt))
                accuracy[source][target] = runner.test(probe, test_data[target])
        log.info("source %s: %s", source, ", ".join(f"{t} {a:.1f}%" for t, a in accuracy[source].items()))
    gain = {s: {t: accuracy[s][t] - baseline[t] for t in names} for s in names}
    groups = task_groups(gain, cfg.threshold)
    _write_matrix(output_dir / "accuracy.csv", accuracy)
    _write_matrix(output_dir / "gain.csv", gain)
    what = f"tuned with {cfg.target_shots} shots from the source prompt vs from scratch" if cfg.finetune \
        else "source prompt as it is vs the zero-shot prompt"
    plot_transfer_matrix([[gain[s][t] for t in names] for s in names], names, names, output_dir / "transfer.png",
                         title=f"Gain on the target task, in points: {what}")
    lines = ["# Task groups", "", f"Gain on each target: {what}; tasks share a group when each one's prompt "
             f"raises the other's accuracy by more than {cfg.threshold} points ({time.perf_counter() - started:.0f} s).", "",
             "| target | baseline | " + " | ".join(f"from {s}" for s in names) + " |", "|---" * (len(names) + 2) + "|"]
    lines += [f"| {t} | {baseline[t]:.1f} | " + " | ".join(f"{gain[s][t]:+.1f}" for s in names) + " |" for t in names]
    lines += ["", "Groups:", ""] + [f"- {', '.join(g)}" for g in groups]
    (output_dir / "groups.md").write_text("\n".join(lines) + "\n")
    return TransferabilityStudy(accuracy, gain, baseline, groups)


def main(argv: list[str] | None = None) -> None:
    """``vlprompt transferability``."""
    parser = transferability_parser()
    args = parser.parse_args(argv)
    cfg = load_transferability_config(resolve_config_path(args.config), args.overrides)
    cfg.finetune = cfg.finetune or args.finetune
    if args.print_config:
        sys.stdout.write(config_text(cfg))
        return
    run_transferability(cfg, args.output_dir, overwrite=args.overwrite)
    log.info("%s\nmatrix, heat map and groups in %s", (Path(args.output_dir) / "groups.md").read_text(), args.output_dir)
