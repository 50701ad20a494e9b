"""The ``vlprompt`` command.

``vlprompt fit|validate|test|predict`` is a LightningCLI over :class:`PromptClassifier` and any
LightningDataModule (composable YAMLs in ``configs/``). ``vlprompt demo`` runs the offline demo on
the embedded default; ``vlprompt eval-fewshot`` runs the few-shot transfer evaluation
(zero-shot vs tuned over shots x seeds, and base-to-novel); ``vlprompt tta`` runs test-time
prompt tuning (TPT, DiffTPT) on a folder of images or a dataset.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from vlprompt.methods import PromptClassifier

__all__ = ["VLPromptCLI", "main"]

log = logging.getLogger("vlprompt")


class VLPromptCLI(LightningCLI):
    """LightningCLI that links the data's class names into the model and saves the learned
    prompt (``<log dir>/prompt``) when fitting ends."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.classnames", "model.classnames", apply_on="instantiate")
        # Always keep last.ckpt, so an interrupted fit resumes with --ckpt_path last.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_argument(
            "--save_prompt",
            type=str | None,
            default=None,
            help="Where to save the learned prompt after fit (default: <log dir>/prompt).",
        )

    def after_fit(self) -> None:
        if not isinstance(self.model, PromptClassifier) or not self.trainer.is_global_zero:
            return
        if self.trainer.interrupted:
            log.warning("fit was interrupted; prompt not saved (resume with --ckpt_path last)")
            return
        target = self.config[self.subcommand].get("save_prompt")
        if target is None:
            target = str(Path(self.trainer.log_dir or self.trainer.default_root_dir) / "prompt")
        self.model.save_prompt(target)
        log.info("learned prompt saved to %s", target)


def _setup_logging() -> None:
    # open_clip reports every model build on the root logger; keep that at warnings and ours at info.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vlprompt").setLevel(logging.INFO)
    # bitsandbytes (pulled in by diffusers/transformers) warns about optional CPU kernels we never use.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # The frozen encoder is in eval mode on purpose; Lightning's reminder about it is noise here.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    # `vlprompt demo` runs `vlprompt tta` in-process with its own arguments, on purpose.
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vlprompt`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if argv and argv[0] == "demo":
        from vlprompt.apps.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "tta":
        from vlprompt.apps.tta import main as tta_main

        return tta_main(argv[1:])
    if argv and argv[0] == "eval-fewshot":
        from vlprompt.apps.fewshot import main as fewshot_main

        return fewshot_main(argv[1:])
    VLPromptCLI(
        PromptClassifier,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": False},
    )


if __name__ == "__main__":
    main()
