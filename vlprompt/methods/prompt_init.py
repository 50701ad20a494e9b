"""Starting a prompt learner from a saved prompt or a reference implementation's checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from vlprompt.prompts import PromptLearner
from vlprompt.prompts.io import load_prompt, read_prompt_config

__all__ = ["load_initial_prompt"]

log = logging.getLogger(__name__)


def load_initial_prompt(learner: PromptLearner, path: str | Path) -> None:
    """Copy into ``learner`` the tensors of a saved vlprompt prompt (a directory, checked against
    the learner's method and backbone) or of a Dassl checkpoint of the CoOp/CoCoOp/MaPLe reference
    code (a file, for learners with ``load_dassl_checkpoint``). The learner keeps its classes."""
    path = Path(path)
    if path.is_dir():
        config = read_prompt_config(path)
        if config["method"] != learner.name:
            raise ValueError(f"{path} holds a {config['method']!r} prompt, but this model uses {learner.name!r}")
        saved = load_prompt(path, learner.backbone, classnames=learner.classnames)
        learner.load_state_dict(saved.state_dict())
    elif not path.exists():
        raise FileNotFoundError(f"initial prompt {path} does not exist")
    elif hasattr(learner, "load_dassl_checkpoint"):
        learner.load_dassl_checkpoint(path)
    else:
        raise ValueError(f"{path} is not a saved prompt directory, and {learner.name} cannot import checkpoint files")
    log.info("initialised the %s prompt from %s", learner.name, path)
