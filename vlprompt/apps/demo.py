"""``vlprompt demo``: the offline demo on the embedded default.

Generates the ShapeWorld classification dataset (16 (colour, shape) classes held out from the
embedded CLIP's pretraining), then evaluates zero-shot CLIP against few-shot prompt learning
(CoOp by default) over a few shot counts and in the base-to-novel setting, and prints the
accuracies. Results, tables and a plot land in ``outputs/demo/<timestamp>/``.

Every config declares the runner that reads it with ``runner:`` (none: ``fewshot``): ``tta``
(``shapeworld_tta``) compares zero-shot, TPT and DiffTPT on a shifted test split, with no training;
``multitask`` (``shapeworld_multitask``) runs multitask prompt tuning (MVLPT,
:mod:`vlprompt.apps.multitask`); ``segmentation`` (``seg/shapeworld_demo``) compares referring
segmentation prompts (:mod:`vlprompt.apps.segmentation`); ``gram`` (``shapeworld_gram``) runs the
few-shot evaluation once per setting (:mod:`vlprompt.apps.gram`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vlprompt.apps.commands import demo_parser
from vlprompt.apps.runner import RUNNERS, config_text, declared_runner, read_yaml, select_methods, set_max_epochs
from vlprompt.apps.fewshot import apply_overrides, format_report, load_eval_config, run_fewshot_eval
from vlprompt.resources import bundled_dir
from vlprompt.zoo import available_models

__all__ = ["main"]

log = logging.getLogger("vlprompt.demo")


def main(argv: list[str] | None = None) -> None:
    parser = demo_parser()
    args = parser.parse_args(argv)

    if "shapeworld-clip-tiny" not in available_models():
        raise SystemExit("the embedded model is missing; build it with `python tools/build_embedded_model.py`")
    config = Path(args.config)
    if not config.is_file():
        config = bundled_dir("configs") / ("" if "/" in args.config else "eval") / f"{args.config.removesuffix('.yaml')}.yaml"
        if not config.is_file():
            known = sorted(p.stem for p in (bundled_dir("configs") / "eval").glob("*.yaml")) + ["seg/shapeworld_demo"]
            raise SystemExit(f"--config {args.config!r}: no such file, and not a shipped config ({', '.join(known)})")
    output_dir = Path(args.output_dir or Path("outputs") / "demo" / time.strftime("%Y%m%d-%H%M%S"))
    runner = declared_runner(read_yaml(config), config)
    if runner not in _DEMOS:
        raise SystemExit(f"{config} declares `runner: {runner}`: run it with `vlprompt {RUNNERS[runner]}`")
    _DEMOS[runner](config, args, parser, output_dir)


def _fewshot_demo(config: Path, args: argparse.Namespace, parser: argparse.ArgumentParser, output_dir: Path) -> None:
    cfg = load_eval_config(config, args.overrides)
    if args.data_root:  # the source's images; other domains keep their own folders
        cfg.data.setdefault("init_args", {})["root"] = args.data_root
    apply_overrides(cfg, args, parser)
    if _printed(cfg, args):
        return
    started = time.perf_counter()
    results = run_fewshot_eval(cfg, output_dir)
    plot = output_dir / "accuracy_vs_shots.png"
    log.info(
        "ShapeWorld held-out classes, embedded tiny CLIP (%.0f s):\n%s\nTables: %s%s",
        time.perf_counter() - started,
        format_report(results, list(cfg.transfer.targets) if cfg.transfer else []),
        output_dir / "summary.md",
        f"\nPlot:   {plot}" if plot.exists() else "",
    )


def _tta_demo(path: Path, args: argparse.Namespace, parser: argparse.ArgumentParser, output_dir: Path) -> None:
    from vlprompt.apps.compare_tta import compare_tta, format_comparison, load_tta_comparison

    config = load_tta_comparison(path, args.overrides)
    if args.data_root:
        config.data.setdefault("init_args", {})["root"] = args.data_root
    if _printed(config, args):
        return
    started = time.perf_counter()
    summaries = compare_tta(config, output_dir)
    first = next(iter(summaries.values()))
    log.info(
        "Test-time prompt tuning, ShapeWorld %s test split (%d images, no labels used), embedded tiny CLIP "
        "(%.0f s):\n%s\nPredictions and view pictures: %s",
        config.data.get("init_args", {}).get("domain", ""), first["predicted"], time.perf_counter() - started,
        format_comparison(summaries), output_dir,
    )


def _multitask_demo(config: Path, args: argparse.Namespace, parser: argparse.ArgumentParser, output_dir: Path) -> None:
    from vlprompt.apps.multitask import format_summary, load_multitask_config, run_multitask_eval

    cfg = load_multitask_config(config, args.overrides)
    cfg.methods = select_methods(cfg.methods, args.methods, parser)
    if args.shots:
        cfg.targets.shots = args.shots
    if args.seeds:
        cfg.source.seeds = args.seeds
    set_max_epochs(cfg.methods, args.max_epochs, "trainer", "source_trainer")
    if _printed(cfg, args):
        return
    started = time.perf_counter()
    results = run_multitask_eval(cfg, output_dir)
    log.info("%s\nTables: %s", format_summary(results, cfg, time.perf_counter() - started), output_dir / "summary.md")


def _segmentation_demo(config: Path, args: argparse.Namespace, parser: argparse.ArgumentParser, output_dir: Path) -> None:
    from vlprompt.apps.segmentation import SegmentationEvalConfig, format_table, run_segmentation_eval

    cfg = SegmentationEvalConfig.read(config, args.overrides)
    cfg.methods = select_methods(cfg.methods, args.methods, parser)
    set_max_epochs(cfg.methods, args.max_epochs)
    if args.data_root:
        cfg.data.setdefault("init_args", {})["root"] = args.data_root
    if _printed(cfg, args):
        return
    started = time.perf_counter()
    rows = run_segmentation_eval(cfg, output_dir)
    log.info("Referring segmentation, ShapeWorld %s test split, the embedded VLSMs (tiny CLIP + CLIPSeg-style head; "
             "cris_*: tiny ResNet CLIP + CRIS's head) (%.0f s):"
             "\n%s\nOverlays: %s", cfg.data.get("init_args", {}).get("domain", ""), time.perf_counter() - started,
             format_table(rows), output_dir / "overlays.png")


def _settings_demo(config: Path, args: argparse.Namespace, parser: argparse.ArgumentParser, output_dir: Path) -> None:
    from vlprompt.apps.gram import format_gram_table, run_settings, setting_configs

    if args.print_config:
        sys.stdout.write("\n".join(f"# setting: {name}\n{config_text(cfg)}" for name, cfg in setting_configs(config, args, parser).items()))
        return
    started = time.perf_counter()
    results = run_settings(config, output_dir, args, parser)
    log.info("Few-shot accuracy (%%, mean ± std over seeds), embedded tiny CLIP, %s (%.0f s):\n%s\nTables: %s",
             config.stem, time.perf_counter() - started, format_gram_table(results), output_dir)


def _printed(config: object, args: argparse.Namespace) -> bool:
    """With ``--print_config``: print the config as it would run, and say so."""
    if args.print_config:
        sys.stdout.write(config_text(config))
    return bool(args.print_config)


#: The demo of each runner a config may declare (``runner:``; none: ``fewshot``).
_DEMOS: dict[str, Callable[[Path, argparse.Namespace, argparse.ArgumentParser, Path], None]] = {
    "fewshot": _fewshot_demo, "tta": _tta_demo, "multitask": _multitask_demo, "segmentation": _segmentation_demo,
    "gram": _settings_demo}
