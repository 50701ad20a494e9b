"""Few-shot transfer evaluation: zero-shot vs tuned prompts over shots x seeds, and
base-to-novel generalisation (train on base classes, test on base and novel, harmonic mean).

Driven by a YAML file (see ``configs/eval/``)::

    backbone: {model_name: ViT-B-16, pretrained: openai}
    data: {root: /data, dataset: oxford_pets}          # FewShotDataModule arguments
    zeroshot: {templates: photo}                        # or null to skip the baseline
    methods:
      coop:
        prompt_learner: {class_path: vlprompt.prompts.CoOpPromptLearner, init_args: {n_ctx: 16}}
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.002, momentum: 0.9}}
        max_epochs: 50
        model: {warmup_epochs: 1}                       # other PromptClassifier arguments
    shots: [1, 2, 4, 8, 16]
    seeds: [1, 2, 3]
    base_to_novel: {shots: 16}                          # or null
    trainer: {accelerator: auto, precision: 32-true}

Writes ``results.csv`` (one row per run), ``summary.md`` (tables) and ``accuracy_vs_shots.png``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from vlprompt.backbones import Backbone, OpenCLIPBackbone
from vlprompt.data import FewShotDataModule
from vlprompt.eval.plots import plot_accuracy_vs_shots
from vlprompt.eval.tables import Result, base_novel_table, harmonic_mean, shots_table, summarise, write_csv
from vlprompt.methods import PromptClassifier
from vlprompt.prompts import ZeroShotPrompt

__all__ = ["FewShotEvaluation", "instantiate_callable", "load_eval_config", "main", "run_fewshot_eval"]

log = logging.getLogger(__name__)


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate_callable(spec: dict[str, Any] | None) -> Callable | None:
    """``{class_path, init_args}`` -> a callable with ``init_args`` bound (LightningCLI style)."""
    if spec is None:
        return None
    return functools.partial(_import(spec["class_path"]), **(spec.get("init_args") or {}))


@dataclass
class FewShotEvaluation:
    """What to run; see the module docstring for the YAML form."""

    #: OpenCLIPBackbone arguments, or ``{class_path, init_args}`` (e.g. a TimmBackbone).
    backbone: dict[str, Any]
    #: FewShotDataModule arguments, or ``{class_path, init_args}`` for another data module.
    data: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    zeroshot: dict[str, Any] | None = field(default_factory=lambda: {"templates": "photo"})
    base_to_novel: dict[str, Any] | None = field(default_factory=lambda: {"shots": 16})
    trainer: dict[str, Any] = field(default_factory=dict)
    save_prompts: bool = False

    def backbone_args(self) -> dict[str, Any]:
        """The backbone's own arguments (``init_args`` when a ``class_path`` is given)."""
        if "class_path" in self.backbone:
            return self.backbone.setdefault("init_args", {})
        return self.backbone

    def build_backbone(self) -> Backbone:
        """``OpenCLIPBackbone(**backbone)``, or ``{class_path, init_args}`` for another backbone."""
        if "class_path" in self.backbone:
            return instantiate_callable(self.backbone)()
        return OpenCLIPBackbone(**self.backbone)

    def data_module_class(self) -> tuple[type[FewShotDataModule], dict[str, Any]]:
        if "class_path" in self.data:
            return _import(self.data["class_path"]), dict(self.data.get("init_args") or {})
        return FewShotDataModule, dict(self.data)

    def runs(self) -> list[tuple[str, int, int, str]]:
        """``(method, shots, seed, train subset)`` for every training run."""
        out = [(m, s, seed, "all") for m in self.methods for s in self.shots for seed in self.seeds]
        if self.base_to_novel:
            out += [(m, self.base_to_novel.get("shots", 16), seed, "base") for m in self.methods for seed in self.seeds]
        return out


def load_eval_config(path: str | Path) -> FewShotEvaluation:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - set(FewShotEvaluation.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(FewShotEvaluation.__dataclass_fields__)}")
    return FewShotEvaluation(**raw)


class _Runner:
    def __init__(self, cfg: FewShotEvaluation, output_dir: Path) -> None:
        self.cfg = cfg
        self.output_dir = output_dir
        self.backbone: Backbone = cfg.build_backbone()

    def datamodule(self, shots: int, seed: int, subset: str) -> FewShotDataModule:
        cls, kwargs = self.cfg.data_module_class()
        return cls(**{**kwargs, "shots": shots, "seed": seed, "subset": subset})

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

    def test(self, model: PromptClassifier, dm: FewShotDataModule) -> float:
        metrics = self.trainer().test(model, datamodule=dm, verbose=False)
        return 100.0 * metrics[0]["test/acc"]

    def zeroshot(self) -> list[Result]:
        if self.cfg.zeroshot is None:
            return []
        settings = (["all"] if self.cfg.shots else []) + (["base", "novel"] if self.cfg.base_to_novel else [])
        out = []
        for setting in settings:
            dm = self.datamodule(shots=-1, seed=1, subset=setting)
            templates = self.cfg.zeroshot.get("templates", "photo")
            if templates == "dataset":
                templates = dm.template or "photo"
            factory = functools.partial(ZeroShotPrompt, templates=templates)
            model = PromptClassifier(self.backbone, factory, dm.classnames)
            out.append(Result("zeroshot", 0, 0, setting, self.test(model, dm)))
            log.info("zero-shot on %s classes: %.1f%%", setting, out[-1].accuracy)
        return out

    def train_and_test(self, method: str, shots: int, seed: int, subset: str) -> list[Result]:
        spec = copy.deepcopy(self.cfg.methods[method])
        pl.seed_everything(seed, workers=True, verbose=False)
        dm = self.datamodule(shots, seed, subset)
        model_kwargs = dict(spec.get("model") or {})
        optimizer = instantiate_callable(spec.get("optimizer"))
        if optimizer is not None:
            model_kwargs["optimizer"] = optimizer
        model = PromptClassifier(self.backbone, instantiate_callable(spec["prompt_learner"]), dm.classnames, **model_kwargs)
        self.trainer(max_epochs=spec.get("max_epochs", 50), limit_val_batches=0).fit(model, datamodule=dm)
        if self.cfg.save_prompts:
            model.save_prompt(self.output_dir / "prompts" / f"{method}_{subset}_{shots}shot_seed{seed}", overwrite=True)
        results = [Result(method, shots, seed, subset, self.test(model, dm))]
        if subset == "base":
            novel = self.datamodule(shots, seed, "novel")
            results.append(Result(method, shots, seed, "novel", self.test(model, novel)))
        return results


def run_fewshot_eval(cfg: FewShotEvaluation, output_dir: str | Path, *, overwrite: bool = False) -> list[Result]:
    """Run every configured evaluation and write the tables and plot into ``output_dir``."""
    output_dir = Path(output_dir)
    results_file = output_dir / "results.csv"
    if results_file.exists() and not overwrite:
        raise FileExistsError(f"{results_file} exists; choose another --output-dir or pass --overwrite")
    output_dir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|modules? in eval mode|LeafSpec).*")
    for name in ("lightning.pytorch", "lightning.fabric"):  # one line per run is ours to print
        logging.getLogger(name).setLevel(logging.WARNING)
    runner = _Runner(cfg, output_dir)
    started = time.perf_counter()
    results = runner.zeroshot()
    runs = cfg.runs()
    from tqdm.auto import tqdm

    for method, shots, seed, subset in tqdm(runs, desc="few-shot runs", unit="run"):
        new = runner.train_and_test(method, shots, seed, subset)
        for r in new:
            log.info("%s %d-shot seed %d, trained on %s, tested on %s: %.1f%%", method, shots, seed, subset, r.setting, r.accuracy)
        results += new
        write_csv(results, results_file)  # keep partial results if interrupted
    write_csv(results, results_file)
    methods = (["zeroshot"] if cfg.zeroshot else []) + list(cfg.methods)
    summary = [
        "# Few-shot evaluation",
        "",
        f"Backbone: `{cfg.backbone_args().get('model_name')}` (pretrained: `{cfg.backbone_args().get('pretrained')}`); "
        f"data: `{_data_name(cfg)}`; seeds: {cfg.seeds}; "
        f"time: {time.perf_counter() - started:.0f} s.",
    ]
    if cfg.shots:
        summary += ["", "## Accuracy (%) on all classes", "", shots_table(results, methods)]
    if cfg.base_to_novel:
        summary += ["", f"## Base-to-novel ({cfg.base_to_novel.get('shots', 16)} shots on base classes)", "",
                    base_novel_table(results, methods)]
    (output_dir / "summary.md").write_text("\n".join(summary) + "\n")
    if cfg.shots:
        plot_accuracy_vs_shots(results, output_dir / "accuracy_vs_shots.png")
    return results


def _data_name(cfg: FewShotEvaluation) -> str:
    cls, kwargs = cfg.data_module_class()
    shown = ", ".join(f"{k}={kwargs[k]}" for k in ("dataset", "root", "domain") if kwargs.get(k))
    return f"{cls.__name__}({shown})"


def format_report(results: Sequence[Result]) -> str:
    """Short plain-text report for the terminal: accuracy over shots, then base-to-novel."""
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``vlprompt eval-fewshot`` / ``tools/eval_fewshot.py``."""
    parser = argparse.ArgumentParser(prog="vlprompt eval-fewshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="evaluation YAML (see configs/eval/)")
    parser.add_argument("--output-dir", default="outputs/eval_fewshot")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results in --output-dir")
    parser.add_argument("--root", help="override data.root")
    parser.add_argument("--model-name", help="override backbone.model_name")
    parser.add_argument("--pretrained", help="override backbone.pretrained")
    parser.add_argument("--shots", type=int, nargs="+", help="override shots")
    parser.add_argument("--seeds", type=int, nargs="+", help="override seeds")
    parser.add_argument("--methods", nargs="+", help="only these methods from the config")
    parser.add_argument("--max-epochs", type=int, help="override every method's max_epochs")
    parser.add_argument("--no-base-to-novel", action="store_true")
    parser.add_argument("--save-prompts", action="store_true", help="save every learned prompt under output-dir/prompts")
    args = parser.parse_args(argv)
    cfg = load_eval_config(args.config)
    if args.root:
        (cfg.data.setdefault("init_args", {}) if "class_path" in cfg.data else cfg.data)["root"] = args.root
    if args.model_name:
        cfg.backbone_args()["model_name"] = args.model_name
    if args.pretrained:
        cfg.backbone_args()["pretrained"] = args.pretrained
    if args.shots:
        cfg.shots = args.shots
    if args.seeds:
        cfg.seeds = args.seeds
    if args.methods:
        missing = set(args.methods) - set(cfg.methods)
        if missing:
            parser.error(f"methods {sorted(missing)} are not in {args.config} (it has {sorted(cfg.methods)})")
        cfg.methods = {m: cfg.methods[m] for m in args.methods}
    if args.max_epochs:
        for spec in cfg.methods.values():
            spec["max_epochs"] = args.max_epochs
    if args.no_base_to_novel:
        cfg.base_to_novel = None
    cfg.save_prompts = cfg.save_prompts or args.save_prompts
    results = run_fewshot_eval(cfg, args.output_dir, overwrite=args.overwrite)
    log.info("results:\n%s\nwritten to %s", format_report(results), args.output_dir)
