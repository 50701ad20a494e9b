"""Few-shot transfer evaluation: zero-shot vs tuned prompts over shots x seeds, base-to-novel
generalisation, and transfer to other datasets (cross-dataset, domain generalisation).

Driven by a YAML file in the project's one config dialect (see ``configs/eval/``): the backbone
and the data modules are ``class_path``/``init_args``, and each method refers to a method YAML in
``configs/methods/`` (what ``vlprompt fit --config`` takes) with optional overrides::

    backbone: {class_path: vlprompt.backbones.OpenCLIPBackbone, init_args: {model_name: ViT-B-16, pretrained: openai}}
    data: {class_path: vlprompt.data.FewShotDataModule, init_args: {root: /data, dataset: oxford_pets}}
    zeroshot: {templates: dataset}                   # or null to skip the baseline
    methods:
      coop:
        config: methods/coop.yaml                    # relative to this file, or to the shipped configs/
        model: {optimizer: {init_args: {lr: 0.002}}} # overrides of the method YAML's model section
        trainer: {max_epochs: 50}                    # overrides of its trainer section
    shots: [1, 2, 4, 8, 16]
    seeds: [1, 2, 3]
    base_to_novel: {shots: 16}                       # or null
    transfer:                                        # or null: cross-dataset / domain generalisation
      name: cross-dataset
      shots: 16
      targets:                                       # each tested with its own class names
        dtd: {class_path: vlprompt.data.FewShotDataModule, init_args: {root: /data, dataset: dtd}}
    trainer: {accelerator: auto, precision: 32-true}
    feature_bank: ~/.cache/vlprompt/feature_bank      # or null: reuse augmented-view features across runs

Writes ``results.csv`` (one row per run), ``summary.md`` (tables) and ``accuracy_vs_shots.png``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from vlprompt.apps.commands import fewshot_parser
from vlprompt.apps.runner import (
    MethodRecipe,
    config_text,
    instantiate,
    method_recipe,
    prepare_output_dir,
    read_config,
    resolve_config_path,
    select_methods,
    set_max_epochs,
)
from vlprompt.backbones import Backbone
from vlprompt.eval.plots import plot_accuracy_vs_shots
from vlprompt.eval.tables import (
    Result,
    base_novel_table,
    harmonic_mean,
    shots_table,
    summarise,
    transfer_table,
    write_csv,
)
from vlprompt.methods import PromptClassifier
from vlprompt.methods.features import ImageFeatureCache
from vlprompt.prompts import ZeroShotPrompt

__all__ = [
    "EvaluationConfig",
    "TransferProtocol",
    "format_report",
    "load_eval_config",
    "main",
    "run_fewshot_eval",
]

log = logging.getLogger(__name__)



@dataclass
class TransferProtocol:
    """Train on the source data once per seed (``shots`` per class of its ``subset``), then test on
    the source and on each target data module, each with its own class names: cross-dataset
    transfer (other datasets) or domain generalisation (ImageNet to -V2/-Sketch/-A/-R)."""

    targets: dict[str, dict[str, Any]]
    name: str = "cross-dataset"
    shots: int = 16
    subset: str = "all"


@dataclass
class EvaluationConfig:
    """What to run; see the module docstring for the YAML form."""

    #: ``{class_path, init_args}`` of a :class:`~vlprompt.backbones.Backbone`.
    backbone: dict[str, Any]
    #: ``{class_path, init_args}`` of the source data module (shots, seed and subset set per run).
    data: dict[str, Any]
    #: name -> ``{config: method YAML(s), model: overrides, trainer: overrides}``.
    methods: dict[str, dict[str, Any]]
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    zeroshot: dict[str, Any] | None = field(default_factory=lambda: {"templates": "photo"})
    base_to_novel: dict[str, Any] | None = field(default_factory=lambda: {"shots": 16})
    transfer: TransferProtocol | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    save_prompts: bool = False
    #: A feature bank folder shared by every run (:class:`~vlprompt.methods.feature_bank.FeatureBank`):
    #: text-side methods then encode each image's view of each epoch once for the whole sweep. The
    #: data's ``augment_seed`` is set to 0 unless the data spec sets it.
    feature_bank: str | None = None
    #: Folder that relative method config paths are resolved against (the evaluation YAML's).
    config_dir: Path | None = None

    def __post_init__(self) -> None:
        for what, spec in (("backbone", self.backbone), ("data", self.data)):
            if not isinstance(spec, dict) or "class_path" not in spec:
                raise ValueError(f"{what}: give class_path and init_args (the config dialect of vlprompt fit)")
        if isinstance(self.transfer, dict):
            self.transfer = TransferProtocol(**self.transfer)
        for name, spec in self.methods.items():
            if not isinstance(spec, dict) or "config" not in spec:
                raise ValueError(f"method {name!r}: give `config:` (a method YAML such as methods/coop.yaml) and "
                                 "optionally `model:` / `trainer:` overrides")
            unknown = set(spec) - {"config", "model", "trainer"}
            if unknown:
                raise ValueError(f"method {name!r}: unknown keys {sorted(unknown)} (config, model, trainer)")

    def recipe(self, method: str) -> MethodRecipe:
        return method_recipe(self.methods[method], self.config_dir)

    def set_data_root(self, root: str) -> None:
        """Point the source and every target data module at the data root ``root``."""
        for spec in [self.data, *(self.transfer.targets.values() if self.transfer else [])]:
            spec.setdefault("init_args", {})["root"] = root

    def runs(self) -> list[tuple[str, int, int, str]]:
        """``(method, shots, seed, protocol)`` for every training run (protocol: ``all``, ``base``
        or ``transfer``)."""
        out = [(m, s, seed, "all") for m in self.methods for s in self.shots for seed in self.seeds]
        if self.base_to_novel:
            out += [(m, self.base_to_novel.get("shots", 16), seed, "base") for m in self.methods for seed in self.seeds]
        if self.transfer:
            out += [(m, self.transfer.shots, seed, "transfer") for m in self.methods for seed in self.seeds]
        return out


def load_eval_config(path: str | Path, overrides: Sequence[str] = ()) -> EvaluationConfig:
    """Read an evaluation YAML (unknown keys are an error), with dotted ``overrides``."""
    return read_config(EvaluationConfig, path, "fewshot", overrides=overrides)


class _Runner:
    def __init__(self, cfg: EvaluationConfig, output_dir: Path) -> None:
        self.cfg = cfg
        self.output_dir = output_dir
        self.backbone: Backbone = instantiate(Backbone, cfg.backbone)
        self.recipes = {name: cfg.recipe(name) for name in cfg.methods}  # parse every method up front
        # One backbone for every run: evaluation images' features are encoded once for the sweep
        # (by learners that leave the image tower untouched; keyed by the data's identity).
        self.feature_cache = ImageFeatureCache()

    def datamodule(self, spec: dict[str, Any] | None = None, **init_args: Any) -> pl.LightningDataModule:
        return instantiate(pl.LightningDataModule, spec or self.cfg.data, **init_args)

    def training_datamodule(self, **init_args: Any) -> pl.LightningDataModule:
        """The source data module of a training run (seeded views when a feature bank is used)."""
        if self.cfg.feature_bank and "augment_seed" not in self.cfg.data.get("init_args", {}):
            init_args["augment_seed"] = 0
        return self.datamodule(**init_args)

    def trainer(self, **overrides: Any) -> pl.Trainer:
        kwargs = {
            "accelerator": "auto",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **self.cfg.trainer,
            **overrides,
        }
        return pl.Trainer(**kwargs)

    def test(self, model: PromptClassifier, dm: pl.LightningDataModule) -> float:
        metrics = self.trainer().test(model, datamodule=dm, verbose=False)
        return 100.0 * metrics[0]["test/acc"]

    def zeroshot_model(self, dm: Any) -> PromptClassifier:
        templates = self.cfg.zeroshot.get("templates", "photo")
        if templates == "dataset":
            templates = getattr(dm, "template", None) or "photo"
        model = PromptClassifier(self.backbone, _zero_shot(templates), dm.classnames)
        model.feature_cache = self.feature_cache
        return model

    def zeroshot(self) -> list[Result]:
        if self.cfg.zeroshot is None:
            return []
        settings = (["all"] if self.cfg.shots else []) + (["base", "novel"] if self.cfg.base_to_novel else [])
        out = []
        for setting in settings:
            dm = self.datamodule(shots=-1, seed=1, subset=setting)
            out.append(Result("zeroshot", 0, 0, setting, self.test(self.zeroshot_model(dm), dm)))
            log.info("zero-shot on %s classes: %.1f%%", setting, out[-1].accuracy)
        if self.cfg.transfer:
            for name, dm in self.transfer_data(shots=-1, seed=1):
                out.append(Result("zeroshot", 0, 0, "transfer", self.test(self.zeroshot_model(dm), dm), name))
                log.info("zero-shot on %s: %.1f%%", name, out[-1].accuracy)
        return out

    def transfer_data(self, shots: int, seed: int) -> list[tuple[str, pl.LightningDataModule]]:
        """The source (with the protocol's class subset) and every target, in table order."""
        protocol = self.cfg.transfer
        data = [("source", self.datamodule(shots=shots, seed=seed, subset=protocol.subset))]
        return data + [(name, self.datamodule(spec)) for name, spec in protocol.targets.items()]

    def train_and_test(self, method: str, shots: int, seed: int, protocol: str) -> list[Result]:
        pl.seed_everything(seed, workers=True, verbose=False)
        subset = self.cfg.transfer.subset if protocol == "transfer" else protocol
        dm = self.training_datamodule(shots=shots, seed=seed, subset=subset)
        bank = {"feature_bank": str(Path(self.cfg.feature_bank).expanduser())} if self.cfg.feature_bank else {}
        model, trainer_args = self.recipes[method].build(self.backbone, dm.classnames, **bank)
        model.feature_cache = self.feature_cache
        self.trainer(**{"max_epochs": 50, **trainer_args, "limit_val_batches": 0}).fit(model, datamodule=dm)
        if self.cfg.save_prompts:
            model.save_prompt(self.output_dir / "prompts" / f"{method}_{protocol}_{shots}shot_seed{seed}", overwrite=True)
        if protocol == "transfer":
            results = [Result(method, shots, seed, "transfer", self.test(model, dm), "source")]
            for name, target in self.transfer_data(shots, seed)[1:]:
                results.append(Result(method, shots, seed, "transfer", self.test(model, target), name))
            return results
        results = [Result(method, shots, seed, subset, self.test(model, dm))]
        if subset == "base":
            novel = self.datamodule(shots=shots, seed=seed, subset="novel")
            results.append(Result(method, shots, seed, "novel", self.test(model, novel)))
        return results


def _zero_shot(templates: str | list[str]) -> functools.partial:
    return functools.partial(ZeroShotPrompt, templates=templates)




def run_fewshot_eval(cfg: EvaluationConfig, output_dir: str | Path, *, overwrite: bool = False) -> list[Result]:
    """Run every configured evaluation and write the tables and plot into ``output_dir``."""
    output_dir = prepare_output_dir(output_dir, "results.csv", overwrite)
    results_file = output_dir / "results.csv"
    runner = _Runner(cfg, output_dir)
    started = time.perf_counter()
    results = runner.zeroshot()
    from tqdm.auto import tqdm

    for method, shots, seed, protocol in tqdm(cfg.runs(), desc="runs", unit="run"):
        new = runner.train_and_test(method, shots, seed, protocol)
        for r in new:
            log.info("%s %d-shot seed %d (%s): %s %.1f%%", method, shots, seed, protocol,
                     r.dataset if protocol == "transfer" else r.setting, r.accuracy)
        results += new
        write_csv(results, results_file)  # keep partial results if interrupted
    write_csv(results, results_file)
    methods = (["zeroshot"] if cfg.zeroshot else []) + list(cfg.methods)
    backbone = cfg.backbone.get("init_args", {})
    summary = [
        "# Few-shot evaluation",
        "",
        f"Backbone: `{backbone.get('model_name')}` (pretrained: `{backbone.get('pretrained')}`); "
        f"data: `{_data_name(cfg.data)}`; seeds: {cfg.seeds}; time: {time.perf_counter() - started:.0f} s.",
    ]
    if cfg.shots:
        summary += ["", "## Accuracy (%) on all classes", "", shots_table(results, methods)]
    if cfg.base_to_novel:
        summary += ["", f"## Base-to-novel ({cfg.base_to_novel.get('shots', 16)} shots on base classes)", "",
                    base_novel_table(results, methods)]
    if cfg.transfer:
        protocol = cfg.transfer
        summary += ["", f"## {protocol.name.capitalize()} ({protocol.shots} shots per source class, "
                    f"{protocol.subset} classes of the source)", ""]
        summary += [f"- {name}: `{_data_name(spec)}`" for name, spec in protocol.targets.items()]
        summary += ["", transfer_table(results, methods, list(protocol.targets))]
    (output_dir / "summary.md").write_text("\n".join(summary) + "\n")
    if cfg.shots:
        plot_accuracy_vs_shots(results, output_dir / "accuracy_vs_shots.png")
    return results


def _data_name(spec: dict[str, Any]) -> str:
    kwargs = spec.get("init_args") or {}
    shown = ", ".join(f"{k}={kwargs[k]}" for k in ("dataset", "root", "domain", "subset") if kwargs.get(k))
    return f"{spec['class_path'].rpartition('.')[2]}({shown})"


def format_report(results: Sequence[Result], transfer_targets: Sequence[str] = ()) -> str:
    """Short plain-text report for the terminal: accuracy over shots, base-to-novel, transfer."""
    stats = summarise(results)
    lines = []
    for (method, shots, setting), (mean, std, n) in sorted(
        stats.items(), key=lambda kv: (kv[0][0] != "zeroshot", kv[0][0], kv[0][1])
    ):
        if setting != "all":
            continue
        label = "zero-shot" if method == "zeroshot" else f"{method} {shots}-shot"
        spread = f" ± {std:.1f} ({n} seeds)" if n > 1 else ""
        lines.append(f"  all classes | {label:<18} {mean:5.1f}%{spread}")
    bases = {m: v[0] for (m, _, s), v in stats.items() if s == "base"}
    novels = {m: v[0] for (m, _, s), v in stats.items() if s == "novel"}
    paired = [m for m in bases if m in novels]
    if paired:
        lines.append(f"  {'base-to-novel':<18} {'base':>6} {'novel':>6} {'HM':>6}")
        for m in sorted(paired, key=lambda m: m != "zeroshot"):
            label = "zero-shot" if m == "zeroshot" else m
            hm = harmonic_mean(bases[m], novels[m])
            lines.append(f"  {label:<18} {bases[m]:6.1f} {novels[m]:6.1f} {hm:6.1f}")
    if transfer_targets:
        methods = list(dict.fromkeys(r.method for r in results if r.setting == "transfer"))
        table = transfer_table(results, sorted(methods, key=lambda m: m != "zeroshot"), transfer_targets)
        lines += ["  " + line for line in table.splitlines() if not line.startswith("|---")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``vlprompt eval-fewshot`` / ``tools/eval_fewshot.py``."""
    parser = fewshot_parser()
    args = parser.parse_args(argv)
    cfg = load_eval_config(resolve_config_path(args.config), args.overrides)
    apply_overrides(cfg, args, parser)
    if args.print_config:
        sys.stdout.write(config_text(cfg))
        return
    results = run_fewshot_eval(cfg, args.output_dir, overwrite=args.overwrite)
    targets = list(cfg.transfer.targets) if cfg.transfer else []
    log.info("results:\n%s\nwritten to %s", format_report(results, targets), args.output_dir)


def apply_overrides(cfg: EvaluationConfig, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Apply the command line's overrides (shared by ``eval-fewshot`` and ``demo``)."""
    if getattr(args, "root", None):
        cfg.set_data_root(args.root)
    backbone_args = cfg.backbone.setdefault("init_args", {})
    if getattr(args, "model_name", None):
        backbone_args["model_name"] = args.model_name
    if getattr(args, "pretrained", None):
        backbone_args["pretrained"] = args.pretrained
    if args.shots is not None:
        cfg.shots = args.shots
    if args.seeds:
        cfg.seeds = args.seeds
    cfg.methods = select_methods(cfg.methods, getattr(args, "methods", None), parser)
    set_max_epochs(cfg.methods, args.max_epochs)
    if getattr(args, "no_base_to_novel", False):
        cfg.base_to_novel = None
    if getattr(args, "no_transfer", False):
        cfg.transfer = None
    cfg.save_prompts = cfg.save_prompts or getattr(args, "save_prompts", False)
