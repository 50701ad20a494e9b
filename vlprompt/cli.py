"""The ``vlprompt`` command.

``vlprompt fit|validate|test|predict`` is a LightningCLI over :class:`PromptClassifier` and any
LightningDataModule (composable YAMLs in ``configs/``). The other subcommands are applications:
``demo`` (the offline demo on the embedded default), ``eval-fewshot`` (few-shot, base-to-novel,
cross-dataset and domain-generalisation evaluation), ``tta`` (test-time prompt tuning on a folder
or a dataset) and ``classify`` (classify images with a saved prompt).

Heavy libraries are imported only by the subcommand that needs them, so ``vlprompt --help`` is
instant. Errors are printed as the project's own one-line message (``VLPROMPT_DEBUG=1`` shows the
traceback).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("vlprompt")

#: subcommand -> one-line description, in the order ``vlprompt --help`` lists them.
COMMANDS = {
    "fit": "train a prompt (LightningCLI; --config files from configs/)",
    "validate": "evaluate on the validation split",
    "test": "evaluate on the test split (e.g. novel classes, --ckpt_path or --model.init_prompt)",
    "predict": "run the model's predict step over a data module",
    "classify": "classify images (a folder or files) with a saved prompt; writes predictions.csv/json",
    "tta": "test-time prompt tuning (TPT, DiffTPT) on a folder of images or a dataset",
    "eval-fewshot": "few-shot, base-to-novel, cross-dataset and domain-generalisation evaluation",
    "demo": "the offline demo on the embedded default (configs/eval/shapeworld_*.yaml)",
}
_LIGHTNING = ("fit", "validate", "test", "predict")


def _overview() -> str:
    lines = ["usage: vlprompt <command> [options]   (vlprompt <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<13} {text}" for name, text in COMMANDS.items()]
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
    # LightningCLI seeds every run (the seed is saved in the run's config.yaml); one line is enough.
    warnings.filterwarnings("ignore", message=r".*No seed found, seed set to.*")


def _project_error(err: BaseException) -> BaseException:
    """The innermost error in the cause/context chain that is not jsonargparse's wrapping: the
    message the user needs (e.g. the data module's "class folder ... contains no images")."""
    chain, seen = [err], {id(err)}
    while True:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or id(nxt) in seen:
            break
        chain.append(nxt)
        seen.add(id(nxt))
    ours = [e for e in chain if not type(e).__module__.startswith(("jsonargparse", "argparse"))]
    return ours[-1] if ours else err


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if "Does not validate against any of the Union subtypes" in text or "Problem with given class_path" in text:
        # jsonargparse folded the constructor's error into its summary: keep the last line of it.
        lines = [ln.strip(" -") for ln in text.splitlines() if ln.strip()]
        text = next((ln for ln in reversed(lines) if ":" in ln), lines[-1])
    return " ".join(text.split())


def _check_ckpt_path(argv: list[str]) -> None:
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else argv[i + 1] if arg == "--ckpt_path" and i + 1 < len(argv) else None
        if value is None or value in ("last", "best", "hpc", "registry", "null"):
            continue
        path = Path(value).expanduser()
        if path.is_dir():
            hint = next(iter(sorted(path.rglob("last.ckpt"))), path / "checkpoints" / "last.ckpt")
            raise ValueError(f"--ckpt_path {value} is a directory; pass the checkpoint file, e.g. {hint}")
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path {value}: no such checkpoint file")


def _lightning(argv: list[str]) -> None:
    from vlprompt.apps.train import run_lightning_cli

    _check_ckpt_path(argv)
    run_lightning_cli(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vlprompt`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"vlprompt: error: unknown command {command!r}; commands: {', '.join(COMMANDS)}\n")
        raise SystemExit(2)
    _setup_logging()
    try:
        if command in _LIGHTNING:
            _lightning(argv)
        elif command == "demo":
            from vlprompt.apps.demo import main as run
            run(rest)
        elif command == "tta":
            from vlprompt.apps.tta import main as run
            run(rest)
        elif command == "eval-fewshot":
            from vlprompt.apps.fewshot import main as run
            run(rest)
        elif command == "classify":
            from vlprompt.apps.classify import main as run
            run(rest)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - every error becomes one readable line
        if os.environ.get("VLPROMPT_DEBUG"):
            raise
        sys.stderr.write(f"vlprompt {command}: error: {_one_line(_project_error(err))}\n"
                         "(set VLPROMPT_DEBUG=1 for the traceback)\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
