"""Comparison of test-time methods on one dataset (the TTA demo): zero-shot (the starting prompt),
TPT, DiffTPT, ... with accuracy and time per image.

The comparison config uses the project's one config dialect: the backbone and the data module are
``class_path``/``init_args``, and each method refers to a test-time method YAML in ``configs/tta/``
(what ``vlprompt tta --config`` takes) with optional overrides::

    backbone: {class_path: vlprompt.backbones.OpenCLIPBackbone, init_args: {model_name: zoo:shapeworld-clip-tiny}}
    data: {class_path: vlprompt.data.ShapeWorldDataModule, init_args: {domain: shifted, test_per_class: 16}}
    methods:
      tpt: {config: ../tta/tpt.yaml}
      difftpt: {config: ../tta/difftpt.yaml, model: {init_args: {n_views: 32}}}
    trainer: {accelerator: cpu}
    pictures: 4
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentParser

from vlprompt.apps.runner import Recipe, instantiate, read_config, resolve_config_path
from vlprompt.backbones import Backbone
from vlprompt.methods import TestTimePromptTuning

__all__ = ["TTAComparisonConfig", "TTARecipe", "compare_tta", "format_comparison", "load_tta_comparison"]

log = logging.getLogger(__name__)


@dataclass
class TTAComparisonConfig:
    """What to compare; see the module docstring for the YAML form (the ``tta:`` section of a
    ``runner: tta`` config)."""

    #: ``{class_path, init_args}`` of a :class:`~vlprompt.backbones.Backbone`, shared by every method.
    backbone: dict[str, Any]
    #: ``{class_path, init_args}`` of the data module whose test split every method predicts.
    data: dict[str, Any]
    #: name -> ``{config: test-time method YAML(s), model: overrides, trainer: overrides}``.
    methods: dict[str, dict[str, Any]]
    trainer: dict[str, Any] = field(default_factory=dict)
    #: How many images' views each method draws (``views/*.png``).
    pictures: int = 2
    config_dir: Path | None = None

    def __post_init__(self) -> None:
        for name, spec in self.methods.items():
            if not isinstance(spec, dict) or "config" not in spec:
                raise ValueError(f"TTA method {name!r}: give `config:` (e.g. ../tta/tpt.yaml) and optionally `model:` overrides")


def load_tta_comparison(path: str | Path, overrides: Sequence[str] = ()) -> TTAComparisonConfig:
    """Read the ``tta:`` section of a ``runner: tta`` config, with dotted ``overrides``."""
    return read_config(TTAComparisonConfig, path, "tta", section="tta", overrides=overrides)


class TTARecipe(Recipe):
    """A test-time method as ``vlprompt tta`` would run it: ``model:`` is ``class_path``/``init_args``
    of a :class:`TestTimePromptTuning` subclass, built over a shared backbone."""

    def add_model_arguments(self, parser: ArgumentParser) -> None:
        # A factory over the backbone: one backbone instance serves every method.
        parser.add_argument("--model", type=Callable[[Backbone], TestTimePromptTuning], required=True)

    def build(self, backbone: Backbone, classnames: Sequence[str]) -> tuple[TestTimePromptTuning, dict[str, Any]]:
        built = self.instantiate()
        return built.model(backbone, classnames=list(classnames)), self.trainer_args(built)


def compare_tta(config: TTAComparisonConfig | dict[str, Any], output_dir: str | Path,
                config_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Run every method of a comparison config on the same data and return their summaries
    (see the module docstring for the config; a dict is read as :class:`TTAComparisonConfig`,
    its method YAMLs relative to ``config_dir``). The first method's starting prompt gives the
    zero-shot accuracy."""
    from vlprompt.apps.tta import run_predictions

    if isinstance(config, dict):
        known = {f.name for f in fields(TTAComparisonConfig)} - {"config_dir"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown keys in the TTA comparison config: {sorted(unknown)} (expected {sorted(known)})")
        config = TTAComparisonConfig(**config, config_dir=config_dir)
    recipes = {}
    for name, spec in config.methods.items():
        paths = [resolve_config_path(c, config.config_dir) for c in (spec["config"] if isinstance(spec["config"], list) else [spec["config"]])]
        recipes[name] = TTARecipe(paths, spec.get("model"), spec.get("trainer"))
    for name in ("lightning.pytorch", "lightning.fabric"):  # one summary line per method is ours to print
        logging.getLogger(name).setLevel(logging.WARNING)
    backbone = instantiate(Backbone, config.backbone)
    output_dir = Path(output_dir)
    summaries = {}
    for name, recipe in recipes.items():
        log.info("test-time tuning with %s", name)
        datamodule = instantiate(pl.LightningDataModule, config.data)
        model, trainer_args = recipe.build(backbone, datamodule.classnames)
        trainer = pl.Trainer(**{"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                                **config.trainer, **trainer_args, "inference_mode": False})
        summaries[name] = run_predictions(model, datamodule, trainer, output_dir / name,
                                          pictures=config.pictures, overwrite=False)
    return summaries


def format_comparison(summaries: dict[str, dict[str, Any]]) -> str:
    """A table: zero-shot (the starting prompt) and each method's accuracy and time per image."""
    first = next(iter(summaries.values()))
    lines = [f"{'method':<10} {'accuracy':>9} {'s/image':>8}", f"{'zero-shot':<10} {first.get('start_accuracy', float('nan')):>8.1f}% {'':>8}"]
    for name, summary in summaries.items():
        lines.append(f"{name:<10} {summary.get('accuracy', float('nan')):>8.1f}% {summary['seconds_per_image']:>8.3f}")
    return "\n".join(lines)
