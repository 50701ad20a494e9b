"""The pieces every application (runner) shares: the one-line-error argument parser, YAML files
read strictly, ``{class_path, init_args}`` specs built the way LightningCLI builds them, method
recipes (a method YAML as ``vlprompt fit`` would run it), the reading of a runner's YAML into its
dataclass, output folders, the images a command is given, and the tuning and testing of prompts
on tasks (:class:`TaskRunner`).

Importing this module costs only the standard library: PyTorch, Lightning and jsonargparse are
imported by the functions that need them, so ``vlprompt <command> --help`` stays instant.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, Union

from vlprompt.resources import bundled_dir

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser, Namespace
    from PIL.Image import Image

    from vlprompt.backbones import Backbone
    from vlprompt.methods import PromptModule

__all__ = [
    "CommandParser",
    "MethodRecipe",
    "RUNNERS",
    "Recipe",
    "TaskRunner",
    "check_unique_keys",
    "config_files",
    "config_text",
    "declared_runner",
    "expand_image_inputs",
    "instantiate",
    "method_recipe",
    "prepare_output_dir",
    "read_config",
    "read_yaml",
    "refuse_duplicate_keys",
    "resolve_config_path",
    "runner_section",
    "select_methods",
    "set_max_epochs",
    "task_score",
    "typed_config",
    "with_overrides",
]

T = TypeVar("T")
C = TypeVar("C")
ImageInput = Union[str, Path, "Image"]


# -- the command line ----------------------------------------------------------------------------------
class CommandParser(argparse.ArgumentParser):
    """``argparse`` parser for a ``vlprompt`` subcommand whose errors are one line
    (``vlprompt classify: error: ...`` and where to find the options), not the whole usage.

    With ``overrides=True`` it also takes overrides of any key of the command's YAML config, dotted
    for nested keys (``--trainer.max_epochs 3``, ``--transfer.shots=8``): they are collected, in
    order, as ``--key=value`` into ``args.overrides`` for :func:`read_config`, which types them
    from the runner's dataclass (an unknown key is an error there)."""

    def __init__(self, *args: Any, overrides: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.takes_overrides = overrides
        if overrides:
            self.add_argument("--print_config", action="store_true",
                              help="print the config as it would run (overrides applied) and exit")
            self.epilog = ((self.epilog or "") + "Any key of the config can be overridden with a dotted option, e.g. "
                           "--trainer.max_epochs 3 or --backbone.init_args.pretrained=openai.").strip()

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        if not self.takes_overrides:
            return super().parse_args(args, namespace)
        parsed, rest = self.parse_known_args(args, namespace)
        parsed.overrides = []
        while rest:
            key, eq, value = rest.pop(0).partition("=")
            if not key.startswith("--") or len(key) < 3:
                self.error(f"unrecognized arguments: {' '.join([key + eq + value, *rest])}")
            if not eq:
                if not rest or rest[0].startswith("--"):
                    self.error(f"{key}: give a value ({key} VALUE or {key}=VALUE)")
                value = rest.pop(0)
            parsed.overrides.append(f"{key}={value}")
        return parsed

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


def expand_image_inputs(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """The images ``classify`` and ``segment`` take: files and in-memory images in order, a folder
    becoming its image files (recursively, sorted). A path that does not exist is an error."""
    from PIL import Image as PILImage

    from vlprompt.data.files import IMAGE_EXTENSIONS, list_images

    items = [images] if isinstance(images, (str, Path, PILImage.Image)) else list(images)
    found: list[ImageInput] = []
    missing: list[str] = []
    for item in items:
        if isinstance(item, PILImage.Image):
            found.append(item)
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            inside = list_images(path)
            if not inside:
                raise ValueError(f"{path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            found += inside
        elif path.exists():
            found.append(path)
        else:
            missing.append(str(path))
    if missing:
        # A mistyped path is the caller's error, not an unreadable image to skip quietly.
        raise FileNotFoundError(f"no such image or folder: {', '.join(missing[:5])}"
                                + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    return found


# -- YAML files ----------------------------------------------------------------------------------------
def _mapping_path(path: list[str]) -> str:
    return f"in {'.'.join(path)}" if path else "at the top level"


def check_unique_keys(text: str, where: str) -> None:
    """Raise ``ValueError`` when a mapping of the YAML ``text`` gives a key twice: a YAML loader
    keeps the last value silently, so one task (method, section ...) would be dropped and another
    run under its name. ``where`` names the file in the message."""
    import yaml

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and name != "<<":  # "<<" merges another mapping in; not a key
                    if name in seen:
                        what = "task" if path and path[-1] == "tasks" else "key"
                        raise ValueError(f"{where}: {what} {name!r} is given twice {_mapping_path(path)} (lines "
                                         f"{seen[name] + 1} and {key.start_mark.line + 1}); give each {what} its own name")
                    seen[name] = key.start_mark.line
                walk(value, [*path, str(name)])
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, [*path, str(i)])

    for document in yaml.compose_all(text, Loader=yaml.SafeLoader):
        walk(document, [])


def read_yaml(path: str | Path) -> Any:
    """The content of a YAML file (an empty file is ``{}``), refusing keys given twice in a mapping
    (:func:`check_unique_keys`)."""
    import yaml

    path = Path(path)
    text = path.read_text()
    check_unique_keys(text, str(path))
    return yaml.safe_load(text) or {}


def config_files(argv: list[str]) -> list[Path]:
    """The files a LightningCLI command line names with ``--config``/``-c`` (those that exist)."""
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return [Path(p) for p in paths if Path(p).is_file()]


def refuse_duplicate_keys() -> None:
    """Make jsonargparse (LightningCLI's ``--config`` files and YAML values) refuse a key given twice
    in a mapping, e.g. two tasks of one name under a ``MultiTaskDataModule``'s ``tasks``; its YAML
    loader is otherwise kept as it is. Idempotent."""
    import yaml
    from jsonargparse import get_loader, set_loader

    loader = get_loader("yaml")
    if getattr(loader, "refuses_duplicate_keys", False):
        return

    def load(stream: str) -> Any:
        check_unique_keys(stream, "YAML")
        return loader(stream)

    load.refuses_duplicate_keys = True  # type: ignore[attr-defined]
    set_loader("yaml", load, exceptions=(yaml.YAMLError,))


# -- runner configs and method recipes -----------------------------------------------------------------
def instantiate(base: type[T], spec: dict[str, Any], **init_args: Any) -> T:
    """Build a ``{class_path, init_args}`` spec (a subclass of ``base``) with jsonargparse, the way
    LightningCLI does, with ``init_args`` overriding the spec's."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "obj", required=True)
    config = parser.parse_object({"obj": spec})
    if init_args:
        config = parser.parse_object({"obj": {"init_args": init_args}}, namespace=config)
    return parser.instantiate(config).obj


def resolve_config_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """A config file named absolutely, relative to ``relative_to`` (the file that names it), or
    relative to the shipped ``configs/`` folder (``methods/coop.yaml``)."""
    path = Path(path).expanduser()
    candidates = [path] if path.is_absolute() else [*([relative_to / path] if relative_to else []), Path.cwd() / path,
                                                    bundled_dir("configs") / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config {str(path)!r} not found; looked in: " + ", ".join(str(c) for c in candidates))


class Recipe:
    """A method as its command would run it: one or more method YAMLs (``model:`` and optionally
    ``trainer:``), later files overriding earlier ones as with repeated ``--config``, plus
    overrides of either section; parsed and instantiated by jsonargparse with the CLI's types.
    Subclasses declare ``model`` (:meth:`add_model_arguments`) and build it (:meth:`build`)."""

    def __init__(self, configs: Sequence[str | Path], model: dict[str, Any] | None = None,
                 trainer: dict[str, Any] | None = None) -> None:
        import lightning.pytorch as pl
        from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

        self.parser = ArgumentParser(exit_on_error=False)
        self.parser.add_argument("--config", action=ActionConfigFile)
        self.add_model_arguments(self.parser)
        self.parser.add_class_arguments(pl.Trainer, "trainer", instantiate=False, sub_configs=True)
        config = Namespace()
        for path in configs:
            config = self.parser.parse_object(read_yaml(path), namespace=config, defaults=False)
        overrides = {k: v for k, v in (("model", model), ("trainer", trainer)) if v}
        if overrides:
            config = self.parser.parse_object(overrides, namespace=config, defaults=False)
        self.config = config
        #: Trainer arguments the method's configs set (e.g. ``max_epochs``, ``callbacks``).
        self.trainer_keys = sorted((config.get("trainer") or Namespace()).keys())

    def add_model_arguments(self, parser: ArgumentParser) -> None:
        raise NotImplementedError

    def instantiate(self) -> Namespace:
        """The configs with defaults, instantiated afresh (new optimizers, callbacks ...)."""
        return self.parser.instantiate(self.parser.parse_object(self.config.as_dict()))

    def trainer_args(self, built: Namespace) -> dict[str, Any]:
        return {k: built.trainer[k] for k in self.trainer_keys}


class MethodRecipe(Recipe):
    """A method as ``vlprompt fit`` would run it (``model:`` holds the arguments of ``module``,
    :class:`PromptClassifier` by default, but the backbone and the class names). The same method
    YAML builds a :class:`~vlprompt.methods.MultiTaskPromptClassifier` with ``module=``."""

    def __init__(self, configs: Sequence[str | Path], model: dict[str, Any] | None = None,
                 trainer: dict[str, Any] | None = None, *, module: type[PromptModule] | None = None) -> None:
        if module is None:
            from vlprompt.methods import PromptClassifier as module
        self.module = module
        super().__init__(configs, model, trainer)

    def add_model_arguments(self, parser: ArgumentParser) -> None:
        skip = {"backbone", "classnames"} & set(inspect.signature(self.module).parameters)
        parser.add_class_arguments(self.module, "model", skip=skip, instantiate=False, sub_configs=True)

    def build(self, backbone: Backbone, classnames: Sequence[str] | None = None,
              **model_args: Any) -> tuple[PromptModule, dict[str, Any]]:
        """A fresh model (``model_args`` override the recipe's; no class names for modules that take
        none, such as :class:`~vlprompt.methods.PromptSegmenter`) and the trainer arguments the
        method sets (fresh callback instances)."""
        built = self.instantiate()
        if classnames is not None:
            model_args = {"classnames": list(classnames), **model_args}
        model = self.module(backbone, **{**dict(vars(built.model)), **model_args})
        return model, self.trainer_args(built)


def method_recipe(spec: dict[str, Any], config_dir: Path | None, *, trainer_key: str = "trainer",
                  module: type[PromptModule] | None = None) -> MethodRecipe:
    """The recipe of a method entry of an evaluation YAML (``config:`` one or more method YAMLs,
    relative to ``config_dir``; ``model:`` and ``trainer_key`` (else ``trainer:``) overrides)."""
    configs = spec["config"] if isinstance(spec["config"], list) else [spec["config"]]
    return MethodRecipe([resolve_config_path(c, config_dir) for c in configs], spec.get("model"),
                        spec.get(trainer_key) or spec.get("trainer"), module=module)


#: The runners, by the name a config declares with ``runner:``, and the command that runs each
#: (``vlprompt demo`` runs all but ``transferability``). A config without ``runner:`` is ``fewshot``'s.
RUNNERS = {"fewshot": "eval-fewshot", "multitask": "eval-multitask", "transferability": "transferability",
           "tta": "demo", "segmentation": "demo", "gram": "demo"}


def declared_runner(raw: Any, path: str | Path) -> str:
    """The runner a config (its YAML content ``raw``) declares with ``runner:``; ``fewshot`` when
    it declares none."""
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of keys, found {type(raw).__name__}")
    name = raw.get("runner", "fewshot")
    if name not in RUNNERS:
        raise ValueError(f"{path}: `runner: {name}` is not a runner of vlprompt ({', '.join(RUNNERS)})")
    return name


def runner_section(path: str | Path, runner: str, section: str | None = None) -> dict[str, Any]:
    """The YAML file ``path`` as the runner ``runner`` reads it (its ``section`` if given), refusing
    a file declared for another runner with the command that runs it."""
    raw = read_yaml(path)
    declared = declared_runner(raw, path)
    if declared != runner and "runner" in raw:
        raise ValueError(f"{path} declares `runner: {declared}`: run it with `vlprompt {RUNNERS[declared]}`")
    raw = {k: v for k, v in raw.items() if k != "runner"}
    if section is not None:
        raw = raw.get(section)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a `{section}:` section (runner: {runner})")
    return raw


def read_config(cls: type[C], path: str | Path, runner: str = "fewshot", section: str | None = None,
                overrides: Sequence[str] = ()) -> C:
    """Read a runner's YAML (declared ``runner: runner``, or without ``runner:``; its ``section``
    if given) into the dataclass ``cls``, typed by jsonargparse from the dataclass's fields, with
    the command line's dotted ``overrides`` (``["--trainer.max_epochs", "3"]``) applied on top.
    Unknown keys are an error; relative method config paths resolve against the YAML's folder
    (``config_dir``). A key given twice in a mapping (two tasks of one name ...) is an error, not
    the last one silently kept."""
    path = Path(path)
    known = {f.name for f in fields(cls)} - {"config_dir"}
    for item in overrides:
        key = item.partition("=")[0]
        if key.removeprefix("--").split(".")[0] not in known:
            raise ValueError(f"{key}: not an option, nor a key of the config ({', '.join(sorted(known))})")
    raw = with_overrides(runner_section(path, runner, section), overrides)
    unknown = set(raw) - known
    if unknown:
        where = f" in `{section}:`" if section else ""
        hint = "" if section or "runner" in read_yaml(path) else (
            f"; a config for another runner declares it with `runner:` ({', '.join(r for r in RUNNERS if r != runner)})")
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}{where}; expected {sorted(known)}{hint}")
    return typed_config(cls, raw, path)


def with_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` with the command line's overrides set (``["--trainer.max_epochs=3",
    "--backbone.init_args.pretrained=openai"]``, as :class:`CommandParser` collects them): each
    dotted key is a path of mappings (made where missing), each value is read as YAML (``3``,
    ``true``, ``[1, 2]``, ``null``)."""
    import copy

    import yaml

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, _, value = item.partition("=")
        parts = key.removeprefix("--").split(".")
        target = raw
        for depth, part in enumerate(parts[:-1]):
            if target.get(part) is None:
                target[part] = {}
            target = target[part]
            if not isinstance(target, dict):
                raise ValueError(f"{key}: {'.'.join(parts[:depth + 1])} is a {type(target).__name__}, not a mapping of keys")
        target[parts[-1]] = yaml.safe_load(value)
    return raw


def typed_config(cls: type[C], raw: dict[str, Any], path: str | Path, overrides: Sequence[str] = ()) -> C:
    """The dataclass ``cls`` from the mapping ``raw`` (read from the YAML file ``path``; dotted
    ``overrides`` set by :func:`with_overrides`), each value checked against its field's type by
    jsonargparse. The dataclass gets the values as written: jsonargparse would fill the
    ``{class_path, init_args}`` specs inside free-form fields with every default of their class,
    which the runners build later, with their own arguments."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=str(path), exit_on_error=False)
    parser.add_class_arguments(cls, skip={"config_dir"})
    raw = with_overrides(raw, overrides)
    parser.parse_object(raw, defaults=True)
    return cls(**raw, config_dir=Path(path).resolve().parent)


def config_text(config: Any) -> str:
    """A runner's config (a dataclass) as the YAML it would be read from: what ``--print_config``
    prints, with the command line's overrides applied."""
    import dataclasses

    import yaml

    as_dict = {k: v for k, v in dataclasses.asdict(config).items() if k != "config_dir"}
    return yaml.safe_dump(as_dict, sort_keys=False)


def select_methods(methods: dict[str, Any], wanted: Sequence[str] | None, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The config's ``methods`` restricted to ``wanted`` (``--methods``; all when none), in that
    order; a name the config lacks is the command line's error."""
    if not wanted:
        return methods
    missing = set(wanted) - set(methods)
    if missing:
        parser.error(f"methods {sorted(missing)} are not in the config (it has {sorted(methods)})")
    return {m: methods[m] for m in wanted}


def set_max_epochs(methods: dict[str, dict[str, Any]], epochs: int | None, *sections: str) -> None:
    """``--max-epochs``: every method's trainer ``sections`` (default ``trainer``) run ``epochs``."""
    for spec in methods.values() if epochs else ():
        for section in sections or ("trainer",):
            spec[section] = {**(spec.get(section) or {}), "max_epochs": epochs}


# -- running ---------------------------------------------------------------------------------------------
def prepare_output_dir(output_dir: str | Path, marker: str, overwrite: bool) -> Path:
    """Create the output folder of an evaluation, refusing one that already holds ``marker`` (its
    results) unless ``overwrite``, and quiet Lightning's per-run chatter: one line per run is ours."""
    output_dir = Path(output_dir)
    if (output_dir / marker).exists() and not overwrite:
        raise FileExistsError(f"{output_dir / marker} exists; choose another --output-dir or pass --overwrite")
    output_dir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|modules? in eval mode|LeafSpec).*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return output_dir


def task_score(metrics: dict[str, float], dm: Any) -> float:
    """The task's own metric (a descriptor may declare mean per-class accuracy), in %."""
    key = "test/acc_per_class_mean" if getattr(dm, "metric", None) == "mean_per_class" else "test/acc"
    return 100.0 * metrics[key]


class TaskRunner:
    """Tuning and testing prompts on tasks, as the applications over several tasks need it: one
    backbone, one trainer configuration, data modules built from ``{class_path, init_args}``."""

    def __init__(self, backbone: dict[str, Any], trainer: dict[str, Any]) -> None:
        from vlprompt.backbones import Backbone

        self.backbone: Backbone = instantiate(Backbone, backbone)
        self.trainer_config = trainer

    def trainer(self, **overrides: Any) -> pl.Trainer:
        import lightning.pytorch as pl

        return pl.Trainer(**{"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
                             "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                             **self.trainer_config, **overrides})

    def data(self, spec: dict[str, Any], shots: int, seed: int) -> pl.LightningDataModule:
        import lightning.pytorch as pl

        return instantiate(pl.LightningDataModule, spec, shots=shots, seed=seed)

    def fit(self, recipe: MethodRecipe, dm: pl.LightningDataModule, seed: int, **model_args: Any) -> PromptModule:
        from lightning.pytorch import seed_everything

        seed_everything(seed, workers=True, verbose=False)
        model, trainer_args = recipe.build(self.backbone, getattr(dm, "classnames", None), **model_args)
        self.trainer(**{"max_epochs": 20, **trainer_args, "limit_val_batches": 0}).fit(model, datamodule=dm)
        return model

    def test(self, model: PromptModule, dm: pl.LightningDataModule) -> float:
        """Accuracy in %, with the task's own metric."""
        return task_score(self.trainer().test(model, datamodule=dm, verbose=False)[0], dm)

    def zeroshot(self, dm: pl.LightningDataModule, templates: str | list[str]) -> float:
        """Zero-shot accuracy in %; ``templates: dataset`` takes the dataset descriptor's template."""
        if templates == "dataset":
            templates = getattr(dm, "template", None) or "photo"
        from vlprompt.methods import PromptClassifier
        from vlprompt.prompts import ZeroShotPrompt

        model = PromptClassifier(self.backbone, functools.partial(ZeroShotPrompt, templates=templates), dm.classnames)
        return self.test(model, dm)
