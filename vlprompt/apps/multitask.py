"""Multitask prompt tuning and transfer (MVLPT): a source prompt learned on several tasks at once,
then used on held-out target tasks.

For every method, the source tasks are tuned together (:class:`~vlprompt.methods.MultiTaskPromptClassifier`)
once per source seed, and the seeds' prompts are averaged element-wise into one source prompt
(:func:`~vlprompt.prompts.average_prompts`). On each target task, at each shot count, four ways of
using the encoder are compared:

* ``zero-shot``: the hand-written prompt;
* ``single``: a prompt tuned on the target task alone, from scratch;
* ``source``: the source prompt as it is, no target tuning;
* ``mvlpt-init``: the target task tuned alone, starting from the source prompt;
* ``multitask``: all target tasks tuned together, starting from the source prompt.

Driven by a YAML file in the project's config dialect (``configs/eval/shapeworld_multitask.yaml``)::

    backbone: {class_path: vlprompt.backbones.OpenCLIPBackbone, init_args: {model_name: zoo:shapeworld-clip-tiny}}
    source:
      tasks:                              # name -> data module (shots and seed are set per run)
        colour: {class_path: vlprompt.data.ShapeWorldDataModule, init_args: {task: colour}}
      shots: 16
      seeds: [1, 2, 3]
      data: {sampling: mixed, batch_size: 32}    # MultiTaskDataModule arguments
      loss: union                                # or task
    targets:
      tasks: {pairs: {class_path: vlprompt.data.ShapeWorldDataModule, init_args: {task: pairs}}}
      shots: [1, 4]
      seeds: [1]
      data: {sampling: mixed, batch_size: 8}
    zeroshot: {templates: "a photo of a {}."}
    methods:
      coop:
        config: ../methods/mvlpt_coop.yaml       # a method YAML, as for eval-fewshot
        model: {...}                             # overrides
        trainer: {max_epochs: 20}                # target tuning
        source_trainer: {max_epochs: 10}         # source tuning (default: trainer)
    trainer: {accelerator: cpu}

Writes ``results.csv``, ``summary.md`` and the prompts (``prompts/<method>/source`` is the
averaged source prompt) into the output folder.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from vlprompt.apps.commands import multitask_parser
from vlprompt.apps.runner import MethodRecipe, TaskRunner, config_text, instantiate, select_methods, method_recipe, prepare_output_dir, read_config, resolve_config_path
from vlprompt.data.multitask import MultiTaskDataModule, check_task_names
from vlprompt.eval.tables import Result, multitask_table, write_csv
from vlprompt.methods import MultiTaskPromptClassifier, PromptClassifier
from vlprompt.methods.module import PromptModule
from vlprompt.prompts import average_prompts

__all__ = ["VARIANTS", "MultiTaskConfig", "TaskSet", "load_multitask_config", "main", "run_multitask_eval"]

log = logging.getLogger(__name__)

#: The ways of using the encoder on a target task, in table order.
VARIANTS = ("zero-shot", "single", "source", "mvlpt-init", "multitask")


@dataclass
class TaskSet:
    """Tasks (name -> ``{class_path, init_args}`` of a data module), how many shots and which
    seeds, the :class:`MultiTaskDataModule` arguments (sampling, batch size ...) and the loss of
    multitask tuning (``union`` or ``task``, see :class:`MultiTaskPromptClassifier`)."""

    tasks: dict[str, dict[str, Any]]
    shots: int | list[int] = 16
    seeds: list[int] = field(default_factory=lambda: [1])
    data: dict[str, Any] = field(default_factory=dict)
    loss: str = "union"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("give at least one task (name: {class_path, init_args})")
        if self.loss not in ("union", "task"):
            raise ValueError(f"loss must be union or task, not {self.loss!r}")
        unknown = set(self.data) - (set(inspect.signature(MultiTaskDataModule).parameters) - {"tasks"})
        if unknown:
            raise ValueError(f"data: {sorted(unknown)} are not MultiTaskDataModule arguments")
        check_task_names(list(self.tasks))  # before anything runs, not when the tasks are first tuned together
        for name, spec in self.tasks.items():
            if not isinstance(spec, dict) or "class_path" not in spec:
                raise ValueError(f"task {name!r}: give class_path and init_args of a data module")


@dataclass
class MultiTaskConfig:
    """What to run; see the module docstring for the YAML form."""

    backbone: dict[str, Any]
    source: TaskSet
    targets: TaskSet
    methods: dict[str, dict[str, Any]]
    zeroshot: dict[str, Any] | None = field(default_factory=lambda: {"templates": "photo"})
    trainer: dict[str, Any] = field(default_factory=dict)
    config_dir: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.source, dict):
            self.source = TaskSet(**self.source)
        if isinstance(self.targets, dict):
            self.targets = TaskSet(**self.targets)
        for name, spec in self.methods.items():
            unknown = set(spec) - {"config", "model", "trainer", "source_trainer"}
            if "config" not in spec or unknown:
                raise ValueError(f"method {name!r}: give `config:` (a method YAML) and optionally `model:`, "
                                 f"`trainer:`, `source_trainer:` (unknown keys: {sorted(unknown)})")

    def recipe(self, method: str, module: type[PromptModule], trainer_key: str = "trainer") -> MethodRecipe:
        return method_recipe(self.methods[method], self.config_dir, trainer_key=trainer_key, module=module)


def load_multitask_config(path: str | Path, overrides: Sequence[str] = ()) -> MultiTaskConfig:
    """Read a multitask evaluation YAML (unknown keys are an error)."""
    return read_config(MultiTaskConfig, path, "multitask", overrides=overrides)




class _Runner(TaskRunner):
    def __init__(self, cfg: MultiTaskConfig, output_dir: Path) -> None:
        super().__init__(cfg.backbone, cfg.trainer)
        self.cfg, self.output_dir = cfg, output_dir
        # Parse every recipe up front: a typo fails before any training.
        self.recipes = {(m, kind): cfg.recipe(m, module, key) for m in cfg.methods
                        for kind, module, key in (("source", MultiTaskPromptClassifier, "source_trainer"),
                                                  ("multitask", MultiTaskPromptClassifier, "trainer"),
                                                  ("single", PromptClassifier, "trainer"))}

    def task(self, tasks: TaskSet, name: str, shots: int, seed: int) -> pl.LightningDataModule:
        return self.data(tasks.tasks[name], shots, seed)

    def tasks(self, tasks: TaskSet, shots: int, seed: int) -> MultiTaskDataModule:
        modules = {name: self.task(tasks, name, shots, seed) for name in tasks.tasks}
        return MultiTaskDataModule(modules, **tasks.data)

    def source_prompt(self, method: str) -> Path:
        """Tune on the source tasks once per seed; the seeds' prompts averaged."""
        source, folder = self.cfg.source, self.output_dir / "prompts" / method
        shots = source.shots if isinstance(source.shots, int) else source.shots[0]
        seeds = []
        for seed in source.seeds:
            model = self.fit(self.recipes[(method, "source")], self.tasks(source, shots, seed), seed, loss=source.loss)
            seeds.append(model.save_prompt(folder / f"source-seed{seed}", overwrite=True))
            log.info("%s: source prompt of seed %d, source tasks %s", method, seed,
                     ", ".join(f"{k} {100 * (v or 0):.1f}%" for k, v in self.test_tasks(model, source, shots, seed).items()))
        return average_prompts(seeds, folder / "source", overwrite=True)

    def test_tasks(self, model: MultiTaskPromptClassifier, tasks: TaskSet, shots: int, seed: int) -> dict[str, float | None]:
        self.trainer().test(model, datamodule=self.tasks(tasks, shots, seed), verbose=False)
        return dict(model.task_results)

    def zeroshot_results(self) -> list[Result]:
        if self.cfg.zeroshot is None:
            return []
        templates = self.cfg.zeroshot.get("templates", "photo")
        return [Result("zeroshot", 0, 0, "zero-shot", self.zeroshot(self.task(self.cfg.targets, name, -1, 1), templates), name)
                for name in self.cfg.targets.tasks]

    def method(self, method: str) -> list[Result]:
        source, targets = self.source_prompt(method), self.cfg.targets
        results = []
        for name in targets.tasks:  # the source prompt as it is
            dm = self.task(targets, name, -1, 1)
            model, _ = self.recipes[(method, "single")].build(self.backbone, dm.classnames, init_prompt=str(source))
            results.append(Result(method, 0, 0, "source", self.test(model, dm), name))
        for shots in ([targets.shots] if isinstance(targets.shots, int) else targets.shots):
            for seed in targets.seeds:
                for name in targets.tasks:
                    dm = self.task(targets, name, shots, seed)
                    for variant, init in (("single", None), ("mvlpt-init", str(source))):
                        model = self.fit(self.recipes[(method, "single")], dm, seed, init_prompt=init)
                        results.append(Result(method, shots, seed, variant, self.test(model, dm), name))
                dm = self.tasks(targets, shots, seed)
                model = self.fit(self.recipes[(method, "multitask")], dm, seed, init_prompt=str(source), loss=targets.loss)
                scores = self.test_tasks(model, targets, shots, seed)
                results += [Result(method, shots, seed, "multitask", 100.0 * s, name) for name, s in scores.items()
                            if s is not None]
                log.info("%s %d-shot seed %d: %s", method, shots, seed, ", ".join(
                    f"{r.setting} {r.dataset} {r.accuracy:.1f}%" for r in results if r.shots == shots and r.seed == seed))
        return results


def _check_tasks(cfg: MultiTaskConfig) -> None:
    """Build every task's data once before anything is trained: all that is missing, in one error."""
    problems = []
    for name, spec in [*((f"source {n}", t) for n, t in cfg.source.tasks.items()),
                       *((f"target {n}", t) for n, t in cfg.targets.tasks.items())]:
        try:
            instantiate(pl.LightningDataModule, spec)
        except Exception as err:  # noqa: BLE001 - collected and raised together below
            cause = err.__cause__ or err
            problems.append(f"{name}: {str(cause).splitlines()[0].rstrip(':')}")
    if problems:
        raise ValueError(f"{len(problems)} task(s) cannot be read: " + "; ".join(problems))


def run_multitask_eval(cfg: MultiTaskConfig, output_dir: str | Path, *, overwrite: bool = False) -> list[Result]:
    """Run the source tuning and every target comparison; write ``results.csv`` and ``summary.md``."""
    output_dir = prepare_output_dir(output_dir, "results.csv", overwrite)
    results_file = output_dir / "results.csv"
    started = time.perf_counter()
    _check_tasks(cfg)
    runner = _Runner(cfg, output_dir)
    results = runner.zeroshot_results()
    from tqdm.auto import tqdm

    for method in tqdm(cfg.methods, desc="methods", unit="method"):
        results += runner.method(method)
        write_csv(results, results_file)  # keep partial results if interrupted
    write_csv(results, results_file)
    (output_dir / "summary.md").write_text(format_summary(results, cfg, time.perf_counter() - started))
    return results


def format_summary(results: Sequence[Result], cfg: MultiTaskConfig, seconds: float) -> str:
    targets = list(cfg.targets.tasks)
    lines = ["# Multitask prompt tuning (MVLPT)", "",
             f"Source tasks: {', '.join(cfg.source.tasks)} ({cfg.source.shots} shots, seeds {cfg.source.seeds}, "
             f"prompts averaged); target tasks: {', '.join(targets)} (seeds {cfg.targets.seeds}); {seconds:.0f} s.", ""]
    for shots in sorted({r.shots for r in results if r.shots > 0}):
        lines += [f"## {shots} shots per target class (accuracy %)", "",
                  multitask_table(results, list(cfg.methods), targets, shots), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``vlprompt eval-multitask``."""
    parser = multitask_parser()
    args = parser.parse_args(argv)
    cfg = load_multitask_config(resolve_config_path(args.config), args.overrides)
    if args.root:
        for spec in [*cfg.source.tasks.values(), *cfg.targets.tasks.values()]:
            spec.setdefault("init_args", {})["root"] = args.root
    cfg.methods = select_methods(cfg.methods, args.methods, parser)
    if args.print_config:
        sys.stdout.write(config_text(cfg))
        return
    run_multitask_eval(cfg, args.output_dir, overwrite=args.overwrite)
    log.info("results:\n%s\nwritten to %s", (Path(args.output_dir) / "summary.md").read_text(), args.output_dir)
