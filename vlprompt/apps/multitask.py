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
      shots: 16                                  # or `target`: each target shot count (MVLPT)
      seeds: [1, 2, 3]
      data: {sampling: mixed, batch_size: 32}    # MultiTaskDataModule arguments
      loss: union                                # or task
      final_model: last                          # or best_val (MVLPT); also for targets
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
averaged source prompt; ``prompts/<method>/source-<k>shot`` with ``source.shots: target``) into the
output folder.

MVLPT's protocol (``scripts/mvlpt/main_*_cut.sh`` with Dassl's ``TEST.FINAL_MODEL best_val``), as
options whose defaults keep vlprompt's:

* ``final_model: best_val`` (of ``source`` and of ``targets``): every tuning validates after each
  epoch and keeps the prompt of the epoch with the best validation score
  (:class:`~vlprompt.methods.best_validation.BestValidationPrompt`; a tie keeps the earlier
  epoch); the source seeds' best prompts are then averaged. The score is the one the reference
  compares: the mean over tasks of each task's own metric when tuning several tasks, the task's
  metric (top-1, or mean per-class accuracy as a descriptor declares) for one. ``last`` (the
  default) keeps the last epoch and validates nothing.
* ``source.shots: target``: the source is tuned with each target shot count in turn (MVLPT's
  ``main_single_elevater_cut.sh`` loads the source trained with ``${SHOTS}``, the target's), so
  there is one source prompt per shot count and the ``source`` row of each table is its own.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl

from vlprompt.apps.commands import multitask_parser
from vlprompt.apps.runner import MethodRecipe, TaskRunner, config_text, instantiate, select_methods, method_recipe, prepare_output_dir, read_config, resolve_config_path
from vlprompt.data.multitask import MultiTaskDataModule, check_task_names
from vlprompt.eval.tables import Result, multitask_table, write_csv
from vlprompt.methods import MultiTaskPromptClassifier, PromptClassifier
from vlprompt.methods.best_validation import BestValidationPrompt
from vlprompt.methods.module import PromptModule
from vlprompt.prompts import average_prompts

__all__ = ["FinalModel", "MultiTaskConfig", "TaskSet", "VARIANTS", "best_val_monitor", "load_multitask_config", "main",
           "run_multitask_eval"]

log = logging.getLogger(__name__)

#: The ways of using the encoder on a target task, in table order.
VARIANTS = ("zero-shot", "single", "source", "mvlpt-init", "multitask")


#: Which prompt a tuning ends with: the last epoch's, or the best validation epoch's (MVLPT).
FinalModel = Literal["last", "best_val"]


@dataclass
class TaskSet:
    """Tasks (name -> ``{class_path, init_args}`` of a data module), how many shots (for the
    source, ``target``: each target shot count in turn, as MVLPT) and which seeds, the
    :class:`MultiTaskDataModule` arguments (sampling, batch size ...), the loss of multitask tuning
    (``union`` or ``task``, see :class:`MultiTaskPromptClassifier`) and which prompt each tuning
    ends with (``final_model``: ``last``, or ``best_val`` as MVLPT; see the module docstring)."""

    tasks: dict[str, dict[str, Any]]
    shots: int | list[int] | Literal["target"] = 16
    seeds: list[int] = field(default_factory=lambda: [1])
    data: dict[str, Any] = field(default_factory=dict)
    loss: str = "union"
    final_model: FinalModel = "last"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("give at least one task (name: {class_path, init_args})")
        if self.loss not in ("union", "task"):
            raise ValueError(f"loss must be union or task, not {self.loss!r}")
        if self.final_model not in ("last", "best_val"):
            raise ValueError(f"final_model must be last or best_val, not {self.final_model!r}")
        if isinstance(self.shots, str) and self.shots != "target":
            raise ValueError(f"shots must be a number, a list of numbers or (for the source) `target`, not {self.shots!r}")
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
        if self.targets.shots == "target":
            raise ValueError("targets: shots: `target` is for the source (tuned with each target shot count)")
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
        #: the averaged source prompt of each (method, source shot count)
        self.sources: dict[tuple[str, int], Path] = {}

    def task(self, tasks: TaskSet, name: str, shots: int, seed: int) -> pl.LightningDataModule:
        return self.data(tasks.tasks[name], shots, seed)

    def tasks(self, tasks: TaskSet, shots: int, seed: int) -> MultiTaskDataModule:
        modules = {name: self.task(tasks, name, shots, seed) for name in tasks.tasks}
        return MultiTaskDataModule(modules, **tasks.data)

    def fit(self, recipe: MethodRecipe, dm: pl.LightningDataModule, seed: int, *, final_model: FinalModel = "last",
            **model_args: Any) -> PromptModule:
        """Tune as :meth:`TaskRunner.fit` (``final_model: last``), or validating after every epoch
        and ending with the best validation epoch's prompt (``best_val``)."""
        if final_model == "last":
            return super().fit(recipe, dm, seed, **model_args)
        from lightning.pytorch import seed_everything

        seed_everything(seed, workers=True, verbose=False)
        model, trainer_args = recipe.build(self.backbone, getattr(dm, "classnames", None), **model_args)
        best = BestValidationPrompt(monitor=best_val_monitor(model, dm))
        callbacks = [*(self.trainer_config.get("callbacks") or []), *(trainer_args.pop("callbacks", None) or []), best]
        self.trainer(**{"max_epochs": 20, **trainer_args, "callbacks": callbacks, "limit_val_batches": 1.0,
                        "check_val_every_n_epoch": 1}).fit(model, datamodule=dm)
        return model

    def source_shots(self, target_shots: int) -> int:
        """The source's shot count when the targets have ``target_shots``."""
        shots = self.cfg.source.shots
        return target_shots if shots == "target" else shots if isinstance(shots, int) else shots[0]

    def source_prompt(self, method: str, shots: int) -> Path:
        """Tune on the source tasks with ``shots`` once per seed; the seeds' prompts averaged
        (computed once per method and shot count)."""
        source, folder = self.cfg.source, self.output_dir / "prompts" / method
        name = f"source-{shots}shot" if source.shots == "target" else "source"
        if (method, shots) in self.sources:
            return self.sources[(method, shots)]
        seeds = []
        for seed in source.seeds:
            model = self.fit(self.recipes[(method, "source")], self.tasks(source, shots, seed), seed, loss=source.loss,
                             final_model=source.final_model)
            seeds.append(model.save_prompt(folder / f"{name}-seed{seed}", overwrite=True))
            log.info("%s: source prompt of seed %d (%d shots), source tasks %s", method, seed, shots,
                     ", ".join(f"{k} {100 * (v or 0):.1f}%" for k, v in self.test_tasks(model, source, shots, seed).items()))
        self.sources[(method, shots)] = average_prompts(seeds, folder / name, overwrite=True)
        return self.sources[(method, shots)]

    def test_tasks(self, model: MultiTaskPromptClassifier, tasks: TaskSet, shots: int, seed: int) -> dict[str, float | None]:
        self.trainer().test(model, datamodule=self.tasks(tasks, shots, seed), verbose=False)
        return dict(model.task_results)

    def zeroshot_results(self) -> list[Result]:
        if self.cfg.zeroshot is None:
            return []
        templates = self.cfg.zeroshot.get("templates", "photo")
        return [Result("zeroshot", 0, 0, "zero-shot", self.zeroshot(self.task(self.cfg.targets, name, -1, 1), templates), name)
                for name in self.cfg.targets.tasks]

    def untuned_source(self, method: str, source: Path, shots: int) -> list[Result]:
        """The source prompt as it is on each target (``shots``: 0 when one source prompt serves
        every shot count)."""
        results = []
        for name in self.cfg.targets.tasks:
            dm = self.task(self.cfg.targets, name, -1, 1)
            model, _ = self.recipes[(method, "single")].build(self.backbone, dm.classnames, init_prompt=str(source))
            results.append(Result(method, shots, 0, "source", self.test(model, dm), name))
        return results

    def method(self, method: str) -> list[Result]:
        targets = self.cfg.targets
        results: list[Result] = []
        for shots in ([targets.shots] if isinstance(targets.shots, int) else targets.shots):
            fresh = (method, self.source_shots(shots)) not in self.sources
            source = self.source_prompt(method, self.source_shots(shots))
            if fresh:
                results += self.untuned_source(method, source, shots if self.cfg.source.shots == "target" else 0)
            for seed in targets.seeds:
                results += self.tuned(method, source, shots, seed)
        return results

    def tuned(self, method: str, source: Path, shots: int, seed: int) -> list[Result]:
        """Each target tuned alone (from scratch and from ``source``), then all together from it."""
        targets, results = self.cfg.targets, []
        for name in targets.tasks:
            dm = self.task(targets, name, shots, seed)
            for variant, init in (("single", None), ("mvlpt-init", str(source))):
                model = self.fit(self.recipes[(method, "single")], dm, seed, init_prompt=init,
                                 final_model=targets.final_model)
                results.append(Result(method, shots, seed, variant, self.test(model, dm), name))
        model = self.fit(self.recipes[(method, "multitask")], self.tasks(targets, shots, seed), seed,
                         init_prompt=str(source), loss=targets.loss, final_model=targets.final_model)
        scores = self.test_tasks(model, targets, shots, seed)
        results += [Result(method, shots, seed, "multitask", 100.0 * s, name) for name, s in scores.items()
                    if s is not None]
        log.info("%s %d-shot seed %d: %s", method, shots, seed,
                 ", ".join(f"{r.setting} {r.dataset} {r.accuracy:.1f}%" for r in results))
        return results


def best_val_monitor(model: PromptModule, dm: Any) -> str:
    """The validation score MVLPT picks the best epoch by: the mean of the tasks' own metrics
    (``val/acc`` of a multitask classifier), or one task's own metric."""
    if isinstance(model, MultiTaskPromptClassifier):
        return "val/acc"
    return "val/acc_per_class_mean" if getattr(dm, "metric", None) == "mean_per_class" else "val/acc"


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


_EPOCH = {"last": "last-epoch", "best_val": "best-validation"}


def format_summary(results: Sequence[Result], cfg: MultiTaskConfig, seconds: float) -> str:
    targets = list(cfg.targets.tasks)
    source_shots = "each target's" if cfg.source.shots == "target" else cfg.source.shots
    lines = ["# Multitask prompt tuning (MVLPT)", "",
             f"Source tasks: {', '.join(cfg.source.tasks)} ({source_shots} shots, seeds {cfg.source.seeds}, "
             f"{_EPOCH[cfg.source.final_model]} prompts averaged); target tasks: {', '.join(targets)} (seeds "
             f"{cfg.targets.seeds}, {_EPOCH[cfg.targets.final_model]} prompts); {seconds:.0f} s.", ""]
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
