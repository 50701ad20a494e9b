"""The ``vlprompt`` command.

``vlprompt fit|validate|test|predict`` is a LightningCLI over :class:`PromptClassifier` and any
LightningDataModule (composable YAMLs in ``configs/``). The other subcommands are applications:
``demo`` (the offline demo on the embedded default), ``eval-fewshot`` (few-shot, base-to-novel,
cross-dataset and domain-generalisation evaluation), ``tta`` (test-time prompt tuning on a folder
or a dataset) and ``classify`` (classify images with a saved prompt).

Heavy libraries are imported only by the subcommand that needs them, so ``vlprompt --help`` is
instant; so is the help of every subcommand (the applications' options are parsed before their
modules are imported, and the help of the LightningCLI commands, which must import Lightning and
the models to build it, is cached per installation, see :func:`_help_cache_file` and
:func:`cache_help`). A run says it
has started as it begins to import PyTorch. Errors are printed as the project's own one-line message
(``VLPROMPT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import importlib.abc
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["COMMANDS", "Command", "cache_help", "error_message", "main"]

log = logging.getLogger("vlprompt")

@dataclass(frozen=True)
class Command:
    """A ``vlprompt`` subcommand: one row of :data:`COMMANDS`."""

    #: ``"module:function"``, called with the arguments after the command's name.
    run: str
    #: One line for ``vlprompt --help``.
    summary: str
    #: ``"module:function"`` returning the command's light parser (standard library only), which reads
    #: the options, and answers ``--help`` or a mistyped option, before ``run``'s module is imported.
    options: str | None = None
    #: Built on LightningCLI: its help needs Lightning and the models, and so is cached.
    lightning: bool = False


#: subcommand -> what runs it, in the order ``vlprompt --help`` lists them. A new application is its
#: module in ``vlprompt/apps/`` and one row here.
COMMANDS: dict[str, Command] = {
    "fit": Command("vlprompt.apps.train:fit", "train a prompt (LightningCLI; --config files from configs/)", lightning=True),
    "validate": Command("vlprompt.apps.train:validate",
                        "evaluate on the validation split (no log folder unless --trainer.logger true)", lightning=True),
    "test": Command("vlprompt.apps.train:test", "evaluate on the test split (--ckpt_path or --model.init_prompt; no log "
                    "folder unless --trainer.logger true)", lightning=True),
    "predict": Command("vlprompt.apps.train:predict", "run the model's predict step over a data module (no log folder "
                       "unless --trainer.logger true)", lightning=True),
    "classify": Command("vlprompt.apps.classify:main",
                        "classify images (a folder or files) with a saved prompt; writes predictions.csv/json"),
    "tta": Command("vlprompt.apps.tta:main", "test-time prompt tuning (TPT, DiffTPT) on a folder of images or a dataset",
                   lightning=True),
    "segment": Command("vlprompt.apps.segment:main",
                       "segment a folder of images with text prompts; writes mask PNGs, overlays and segments.csv"),
    "eval-fewshot": Command("vlprompt.apps.fewshot:main",
                            "few-shot, base-to-novel, cross-dataset and domain-generalisation evaluation",
                            options="vlprompt.apps.commands:fewshot_parser"),
    "eval-multitask": Command("vlprompt.apps.multitask:main", "multitask prompt tuning (MVLPT): a source prompt from "
                              "several tasks, used on target tasks", options="vlprompt.apps.commands:multitask_parser"),
    "transferability": Command("vlprompt.apps.transferability:main", "which tasks help each other: task x task transfer "
                               "matrix, heat map and task groups", options="vlprompt.apps.commands:transferability_parser"),
    "demo": Command("vlprompt.apps.demo:main", "the offline demos on the embedded default (configs/eval/shapeworld_*.yaml, "
                    "configs/seg/)", options="vlprompt.apps.commands:demo_parser"),
}
#: commands built on LightningCLI: their parser needs Lightning and the model classes.
_LIGHTNING_CLI = tuple(name for name, command in COMMANDS.items() if command.lightning)
_HELP = ("-h", "--help")
#: where vlprompt's own code lives: an error raised here carries the project's own message.
_PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__)) + os.sep




def _overview() -> str:
    lines = ["usage: vlprompt <command> [options]   (vlprompt <command> --help for its options)", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "vlprompt --cache-help builds the cached --help of the LightningCLI commands (make install does)"]
    return "\n".join(lines)


def _setup_logging() -> None:
    # open_clip reports every model build on the root logger; keep that at warnings and ours at info.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vlprompt").setLevel(logging.INFO)
    # bitsandbytes (pulled in by diffusers/transformers) warns about optional CPU kernels we never use.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # The frozen encoder is in eval mode on purpose; Lightning's reminder about it is noise here.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    # We hand LightningCLI the arguments ourselves (the subcommand is dispatched here), on purpose.
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
    # LightningCLI seeds every run and records the seed (the run's config.yaml, tta's summary).
    warnings.filterwarnings("ignore", message=r".*No seed found, seed set to.*")
    # Lightning itself still builds torch's deprecated LeafSpec (utilities/_pytree.py) on every run;
    # nothing a user of vlprompt can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    # A data module without validation data returns an empty validation loader on purpose (fit runs
    # without validation); Lightning's reminder that the list is empty says nothing more.
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    # Testing from a run's checkpoint restores its checkpoint callback's state into this run's
    # callback; where this run would save checkpoints does not matter to an evaluation.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")


class _NoAdvertisements(logging.Filter):
    """Drops Lightning's tips to install its cloud products (litlogger, litmodels), printed on every
    run; its other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("💡 Tip:") and ("litlogger" in message or "litmodels" in message))


_NO_ADVERTISEMENTS = _NoAdvertisements()


def _quiet_lightning() -> None:
    """Once a subcommand has imported Lightning: print each of its messages once, and not the seed."""
    if "lightning" not in sys.modules:
        return
    # Lightning gives its "lightning" logger a console handler of its own and still lets records
    # propagate to the root handler set up above, so every message would be printed twice.
    logging.getLogger("lightning").propagate = False
    # The seed is recorded with the run; as the first line of every run it would also come before
    # the one-line error of a run that fails while its classes are built.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    # rank_zero_info logs on the rank-zero logger of whichever Lightning package set it last.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _NO_ADVERTISEMENTS not in logger.filters:
            logger.addFilter(_NO_ADVERTISEMENTS)


# -- a first line at once ------------------------------------------------------------------------------
class _TorchAnnouncer(importlib.abc.MetaPathFinder):
    """Logs one line when PyTorch starts to be imported: importing it, Lightning and the models
    takes seconds (over ten on a small machine) before a run has anything else to say. Finds
    nothing itself; the import goes on as usual."""

    def __init__(self, command: str) -> None:
        self.command = command

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch":
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
            log.info("%s: loading PyTorch and the models", self.command)
        return None


@contextlib.contextmanager
def _announcing_torch(command: str) -> Iterator[None]:
    """Within: the first import of PyTorch (none when the options are wrong) logs that it loads."""
    announcer = _TorchAnnouncer(command)
    if "torch" not in sys.modules:
        sys.meta_path.insert(0, announcer)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(announcer)


# -- fast help ---------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    # vlprompt.data.fewshot.default_cache_dir's rule, not imported from there: that imports torch.
    if os.environ.get("VLPROMPT_CACHE_DIR"):
        return Path(os.environ["VLPROMPT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vlprompt"


@functools.cache
def _installation_key() -> str:
    """What the help of every command depends on in this installation: the interpreter, the
    installed packages (the modification times of the folders they are installed in, which change
    when a package is installed, upgraded or removed) and vlprompt's own source files (name, size,
    modification time). Computed once per process: it stats every source file."""
    import site
    import sysconfig

    key = [sys.version, sys.prefix]
    paths = sysconfig.get_paths()
    for folder in sorted({paths["purelib"], paths["platlib"], site.getusersitepackages()}):
        with contextlib.suppress(OSError):
            key.append(f"{folder}:{os.stat(folder).st_mtime_ns}")
    for folder, dirs, files in os.walk(_PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            stat = os.stat(os.path.join(folder, name))
            key.append(f"{os.path.relpath(os.path.join(folder, name), _PACKAGE_DIR)}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(key)


def _help_cache_file(argv: list[str]) -> Path:
    """Where the help of a LightningCLI command (``argv``: the command and ``--help``) is cached.
    The key holds everything the text depends on: the arguments and the program name, the terminal
    width, the ``JSONARGPARSE`` settings and the installation (:func:`_installation_key`), so an
    edit or an upgrade builds the help anew."""
    key = [repr(argv), os.path.basename(sys.argv[0] or "vlprompt"), str(shutil.get_terminal_size().columns),
           repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("JSONARGPARSE"))), _installation_key()]
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:24]
    return _cache_dir() / "help" / f"{argv[0]}-{digest}.txt"


def _save_help(path: Path, text: str) -> None:
    """Cache a help text (atomically: two commands may write it at once); a cache that cannot be
    written only costs the next ``--help`` its speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(staging, path)
    except OSError as err:
        log.debug("help not cached at %s: %s", path, err)


#: LightningCLI help is formatted at most this wide (click caps its help at 80 the same way), so that
#: one cached text serves every terminal at least as wide.
_HELP_MAX_COLUMNS = 120


@contextlib.contextmanager
def _help_columns(columns: int | None = None) -> Iterator[None]:
    """Within: help is formatted ``columns`` wide (default: the terminal's width, at most
    :data:`_HELP_MAX_COLUMNS`); argparse reads the width from ``COLUMNS``."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(columns or min(shutil.get_terminal_size().columns, _HELP_MAX_COLUMNS))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


def _lightning_help(command: str) -> str:
    """The help of a LightningCLI command at the current width: from the cache, or built (importing
    Lightning and the models: seconds) and cached."""
    argv = [command, "--help"]
    path = _help_cache_file(argv)
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8")
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            _dispatch(command, argv)
    except SystemExit as done:
        if done.code not in (0, None):
            sys.stdout.write(buffer.getvalue())
            raise
    if buffer.getvalue():
        _save_help(path, buffer.getvalue())
    return buffer.getvalue()


def cache_help(widths: tuple[int, ...] = (80, _HELP_MAX_COLUMNS)) -> None:
    """Build and cache the help of every LightningCLI command at each width (``make install`` runs
    this through ``vlprompt --cache-help``, so that even the first ``--help`` is instant)."""
    for columns in widths:
        with _help_columns(columns):
            for command in _LIGHTNING_CLI:
                _lightning_help(command)


# -- errors as one line ------------------------------------------------------------------------------
def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or while handling, outermost first."""
    chain, seen = [err], {id(err)}
    while True:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or id(nxt) in seen:
            return chain
        chain.append(nxt)
        seen.add(id(nxt))


def _raised_in(err: BaseException) -> str:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.realpath(tb.tb_frame.f_code.co_filename) if tb is not None else ""


def _is_wrapping(err: BaseException) -> bool:
    # jsonargparse re-raises a constructor's error inside its own (a union summary, "Problem with
    # given class_path", argparse.ArgumentError), sometimes as a plain ValueError or TypeError.
    return (type(err).__module__.startswith(("jsonargparse", "argparse"))
            or f"{os.sep}jsonargparse{os.sep}" in _raised_in(err))


def _user_error(err: BaseException) -> BaseException:
    """The error the user needs to read: the outermost one raised by vlprompt's code (e.g. the data
    module's "class folder ... contains no images", not jsonargparse's summary of it nor the library
    error our message was raised from); otherwise the first that is not jsonargparse's wrapping,
    or the innermost (jsonargparse's own finding, e.g. a value of the wrong type)."""
    chain = _chain(err)
    ours = [e for e in chain if _raised_in(e).startswith(_PACKAGE_DIR)]
    if ours:
        return ours[0]
    plain = [e for e in chain if not _is_wrapping(e)]
    return plain[0] if plain else chain[-1]


def error_message(err: BaseException) -> str:
    """One line saying what went wrong in ``err`` (see :func:`_user_error`), with the option it
    concerns when jsonargparse names one."""
    cause = _user_error(err)
    text = str(cause).strip() or type(cause).__name__
    if "Does not validate against any of the Union subtypes" in text:
        # A summary over the union's members: keep what each member said, except "not None".
        found = [ln.strip()[2:] for ln in text.splitlines()
                 if ln.strip().startswith("- ") and "NoneType" not in ln and "Union subtypes" not in ln]
        text = "; ".join(found) or text
    text = re.sub(r"<class '([\w.]+)'>", r"\1", " ".join(text.split()))
    if not isinstance(cause, (ValueError, OSError, argparse.ArgumentError)) and not _is_wrapping(cause):
        # A KeyError's or a TypeError's message alone ("'name'") does not say what went wrong.
        text = f"{type(cause).__name__}: {text}"
    if not _raised_in(cause).startswith(_PACKAGE_DIR):
        key = next((m.group(1) for e in _chain(err) if (m := re.search(r'Parser key "([^"]+)"', str(e)))), None)
        if key and key not in text:
            text = f"--{key}: {text}"
    return text


def _fail(command: str, text: str, hint: str) -> NoReturn:
    sys.stderr.write(f"vlprompt {command}: error: {text}\n({hint})\n")
    raise SystemExit(2)


def _load(target: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` names (importing its module)."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _dispatch(command: str, argv: list[str]) -> None:
    """Import the subcommand and run it with its arguments (``argv[1:]``)."""
    run = _load(COMMANDS[command].run)
    _quiet_lightning()
    run(argv[1:])


def _print_lightning_help(command: str) -> None:
    with _help_columns():
        cached = _help_cache_file([command, "--help"]).is_file()
        sys.stdout.write(_lightning_help(command))
        if not cached:  # Lightning is loaded now: the other commands' help costs little more
            sys.stdout.flush()
            for other in _LIGHTNING_CLI:
                _lightning_help(other)


def _run(command: str, rest: list[str]) -> None:
    """Run ``vlprompt command rest``: an application's options are read before it is imported; a
    LightningCLI command's help comes from the cache."""
    help_only = len(rest) == 1 and rest[0] in _HELP
    if help_only and command in _LIGHTNING_CLI:
        _print_lightning_help(command)
        return
    options = COMMANDS[command].options
    if options is not None:
        _load(options)().parse_args(rest)
    with contextlib.ExitStack() as around:
        if not help_only and os.environ.get("LOCAL_RANK", "0") == "0":  # once, not by every DDP process
            around.enter_context(_announcing_torch(command))
        _dispatch(command, [command, *rest])


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vlprompt`` console script: dispatch to the subcommand, and turn any
    error into one line of the project's own message and exit status 2."""
    try:
        _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `vlprompt ... --help | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None


def _main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return
    if argv == ["--cache-help"]:
        _setup_logging()
        cache_help()
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"vlprompt: error: unknown command {command!r}; commands: {', '.join(COMMANDS)}\n"
                         "(`vlprompt --help` describes them)\n")
        raise SystemExit(2)
    _setup_logging()
    debug = bool(os.environ.get("VLPROMPT_DEBUG"))
    try:
        _run(command, rest)
    except SystemExit as done:
        # An application that stops with a message (SystemExit("...")) gets the same one line.
        if isinstance(done.code, str) and not debug:
            _fail(command, " ".join(done.code.split()), "set VLPROMPT_DEBUG=1 for the traceback")
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"vlprompt {command}: interrupted\n")
        raise SystemExit(130) from None
    except Exception as err:  # noqa: BLE001 - every error becomes one readable line
        if debug:
            raise
        hint = (f"`vlprompt {command} --help` lists the options" if isinstance(err, argparse.ArgumentError)
                else "set VLPROMPT_DEBUG=1 for the traceback")
        _fail(command, error_message(err), hint)


if __name__ == "__main__":
    main()
