"""``vlprompt fit|validate|test|predict``: LightningCLI over :class:`PromptClassifier`; the
learned prompt is saved once fitting ends (also under DDP, by rank zero only).

Where a run writes: ``fit`` into a fresh ``<default_root_dir>/lightning_logs/version_N`` (the
logger's folder: ``config.yaml``, ``checkpoints/``, ``prompt/``), also with ``--trainer.logger
false``, which only turns the metric logs off. ``validate``, ``test`` and ``predict`` write nothing
(no logger by default; ``--trainer.logger true`` or a logger class logs them into a folder of
their own).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from vlprompt.apps.runner import config_files, read_yaml, refuse_duplicate_keys
from vlprompt.methods import PromptClassifier
from vlprompt.prompts.io import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["RunConfig", "VLPromptCLI", "check_checkpoint_path", "fit", "fresh_run_dir", "predict", "run_lightning_cli", "test", "validate"]

log = logging.getLogger("vlprompt")

#: What ``vlprompt <command> --help`` says first: what the command does and where it writes.
_DESCRIPTIONS = {
    "fit": "Train a prompt. Writes a fresh <default_root_dir>/lightning_logs/version_N (config.yaml, checkpoints/, "
           "prompt/), also with --trainer.logger false, which only turns the metric logs off.",
    "validate": "Evaluate on the validation split. Prints the metrics and writes nothing unless a logger is asked for "
                "(--trainer.logger true, or a logger class).",
    "test": "Evaluate on the test split. Prints the metrics and writes nothing unless a logger is asked for "
            "(--trainer.logger true, or a logger class).",
    "predict": "Run the model's predict step over a data module. Writes nothing unless a logger is asked for "
               "(--trainer.logger true, or a logger class).",
}
_PARSER_KWARGS = {command: {"description": text} for command, text in _DESCRIPTIONS.items()}

#: ``ckpt_path`` values Lightning resolves itself.
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")


def check_checkpoint_path(value: str | None) -> None:
    """Fail early, with what to pass instead, when ``--ckpt_path`` is not a checkpoint file: a
    missing path, a run's folder, or a saved prompt (which ``--model.init_prompt`` takes)."""
    if value is None or value in _SPECIAL_CKPT or value.startswith("registry:") or "://" in value:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
            raise ValueError(f"--ckpt_path {value} is a saved prompt, not a checkpoint; start from it with "
                             f"--model.init_prompt {value}")
        hint = next(iter(sorted(path.rglob("last.ckpt"))), path / "checkpoints" / "last.ckpt")
        raise ValueError(f"--ckpt_path {value} is a directory; pass the checkpoint file, e.g. {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {value}: no such checkpoint file")


def fresh_run_dir(root: str | Path) -> Path:
    """``<root>/lightning_logs/version_N`` with the next free ``N``: the folder Lightning's default
    logger would give the run. Not created here: under DDP every process computes it before any of
    them writes, so they agree."""
    base = Path(root).expanduser() / "lightning_logs"
    taken = [int(p.name[len("version_"):]) for p in base.glob("version_*") if p.name[len("version_"):].isdigit()]
    return base / f"version_{max(taken, default=-1) + 1}"


def _no_logger(value: Any) -> bool:
    # Trainer(logger=None) means the default logger; False or an empty list means none.
    return value is False or (isinstance(value, (list, tuple)) and not value)


class RunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written into the run's folder (``trainer.log_dir``). A
    validate, test or predict run without a logger has no folder of its own and writes none: the
    file would land in the working directory, and the next run would refuse to overwrite it."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" and not trainer.loggers:
            return
        super().setup(trainer, pl_module, stage)


def _hide_version_number(trainer: pl.Trainer) -> None:
    """Leave ``v_num`` (the log folder's number, the same all run long) out of the progress bar.
    Lightning 2 asks the progress bar, not the module, for what it shows; the bar is Lightning's
    default (rich or tqdm) or the user's, so its ``get_metrics`` is wrapped rather than subclassed."""
    bar = trainer.progress_bar_callback
    if bar is None:
        return
    shown = bar.get_metrics

    def get_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = dict(shown(trainer, pl_module))
        metrics.pop("v_num", None)
        return metrics

    bar.get_metrics = get_metrics


@runtime_checkable
class SavesPrompt(Protocol):
    """A module whose learned prompt ``vlprompt fit`` saves when fitting ends (every
    :class:`~vlprompt.methods.PromptModule`; :class:`~vlprompt.methods.GRAMMetaLearner` saves its
    meta-prompt)."""

    def save_prompt(self, directory: str | Path, *, overwrite: bool = False) -> Path: ...


class VLPromptCLI(LightningCLI):
    """LightningCLI that links the data's class names into the model, always keeps ``last.ckpt``
    (an interrupted fit resumes with ``--ckpt_path``), and saves the learned prompt
    (``<log dir>/prompt`` or ``--save_prompt``) when fitting ends. An existing prompt there is
    refused before training starts unless ``--overwrite_prompt true``. ``fit`` always writes into a
    run folder of its own, also without a logger; ``validate``, ``test`` and ``predict`` log nothing
    unless a logger is asked for (see the module docstring). The progress bar leaves out ``v_num``.
    Parse errors are raised (``vlprompt`` prints them as one line) instead of printing the whole
    usage.

    One CLI for every module: :class:`PromptClassifier` when the configs name no model class,
    otherwise the ``model: class_path`` they name (:class:`~vlprompt.methods.PromptSegmenter`,
    :class:`~vlprompt.methods.GRAMMetaLearner`, a classifier ...). With ``--ckpt_path`` such a
    model is defined by the configs and the checkpoint restores its tensors: Lightning's re-parsing
    of the checkpoint's hyper-parameters would drop the backbone, which (frozen, rebuilt from the
    config) is not among them."""

    def init_parser(self, **kwargs):
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # Classifiers take the data's class names; segmenters and the meta-learner take none.
        if "classnames" in inspect.signature(self._model_class).parameters:
            target = "model.init_args.classnames" if self.subclass_mode_model else "model.classnames"
            parser.link_arguments("data.classnames", target, apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_argument("--save_prompt", type=str | None, default=None,
                            help="Where to save the learned prompt after fit (default: <log dir>/prompt).")
        parser.add_argument("--overwrite_prompt", type=bool, default=False,
                            help="Replace a prompt already saved at --save_prompt.")

    def _parse_ckpt_path(self) -> None:
        if not self.subclass_mode_model:
            super()._parse_ckpt_path()

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand != "fit":
            # Evaluating a run must not open another lightning_logs/version_N for every test:
            # no logger unless one is asked for (--trainer.logger true, or a logger class).
            parser.set_defaults({"trainer.logger": False})
        return parser

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if self.subcommand == "fit" and _no_logger(config.get("logger")):
            # Without a logger, Lightning's log_dir is default_root_dir itself (the working
            # directory by default): config.yaml, checkpoints/ and prompt/ would land there and
            # the next run would refuse to start. The run gets the folder a logger would give it.
            kwargs.setdefault("default_root_dir", str(fresh_run_dir(config.get("default_root_dir") or os.getcwd())))
        trainer = super().instantiate_trainer(**kwargs)
        _hide_version_number(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        # Before the model and the data are built: a wrong --ckpt_path (also from a YAML) fails
        # in a second instead of after loading everything.
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_checkpoint_path(config.get("ckpt_path"))

    def _prompt_target(self) -> Path:
        target = self.config[self.subcommand].get("save_prompt")
        if target is not None:
            return Path(target).expanduser()
        # log_dir is a collective under DDP (a broadcast): every rank must ask for it.
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "prompt"

    def before_fit(self) -> None:
        target = self._prompt_target()
        if (target / CONFIG_NAME).exists() and not self.config[self.subcommand].get("overwrite_prompt"):
            raise FileExistsError(
                f"a prompt is already saved at {target}; choose another --save_prompt or pass "
                "--overwrite_prompt true to replace it (checked before training, nothing was trained)"
            )

    def after_fit(self) -> None:
        if not isinstance(self.model, SavesPrompt):
            return
        target = self._prompt_target()
        if self.trainer.interrupted:
            if self.trainer.is_global_zero:
                log.warning("fit was interrupted; prompt not saved (resume with --ckpt_path <log dir>/checkpoints/last.ckpt)")
            return
        failed: Exception | None = None
        if self.trainer.is_global_zero:
            try:
                self.model.save_prompt(target, overwrite=bool(self.config[self.subcommand].get("overwrite_prompt")))
                log.info("learned prompt saved to %s", target)
            except Exception as err:  # noqa: BLE001 - re-raised below, once the other ranks are released
                failed = err
        # The other ranks wait here until the prompt is on disk; they must not wait forever when
        # saving failed on rank zero.
        self.trainer.strategy.barrier("vlprompt-save-prompt")
        if failed is not None:
            raise failed


def _model_class(argv: list[str]) -> str | None:
    """The ``model: class_path`` a ``--config`` file names, if any (segmentation configs do). A
    file that gives a key twice is refused here, with its name (:func:`read_yaml`)."""
    found = None
    for path in config_files(argv):
        config = read_yaml(path)
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict) and model.get("class_path"):
            found = model["class_path"]
    return found


def run_lightning_cli(argv: list[str]) -> VLPromptCLI:
    """Run ``vlprompt fit|validate|test|predict`` with these arguments: over
    :class:`PromptClassifier`, or over the LightningModule a config names as ``model: class_path``
    (``configs/seg/``: :class:`~vlprompt.methods.PromptSegmenter`, ``configs/gram/``:
    :class:`~vlprompt.methods.GRAMMetaLearner`)."""
    refuse_duplicate_keys()
    class_path = _model_class(argv)
    model, subclass_mode = (PromptClassifier, False) if class_path is None else (_lightning_module(class_path), True)
    return VLPromptCLI(model, subclass_mode_model=subclass_mode, subclass_mode_data=True, args=argv,
                       save_config_callback=RunConfig, save_config_kwargs={"overwrite": False}, parser_kwargs=_PARSER_KWARGS)


def _lightning_module(class_path: str) -> type[pl.LightningModule]:
    """The LightningModule class a config's ``model: class_path`` names (a bare name is looked up in
    :mod:`vlprompt.methods`)."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module or "vlprompt.methods"), name)
    except (ImportError, AttributeError):
        found = None
    if not (isinstance(found, type) and issubclass(found, pl.LightningModule)):
        raise ValueError(f"model class_path {class_path!r} is not a LightningModule (vlprompt fit runs PromptClassifier "
                         "without a class_path, or e.g. vlprompt.methods.PromptSegmenter, vlprompt.methods.GRAMMetaLearner)")
    return found


def fit(argv: list[str]) -> None:
    """``vlprompt fit``: train a prompt (``argv``: the options after the command's name)."""
    run_lightning_cli(["fit", *argv])


def validate(argv: list[str]) -> None:
    """``vlprompt validate``: evaluate on the validation split."""
    run_lightning_cli(["validate", *argv])


def test(argv: list[str]) -> None:
    """``vlprompt test``: evaluate on the test split."""
    run_lightning_cli(["test", *argv])


def predict(argv: list[str]) -> None:
    """``vlprompt predict``: run the model's predict step over a data module."""
    run_lightning_cli(["predict", *argv])
