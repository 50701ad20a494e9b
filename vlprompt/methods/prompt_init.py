"""Starting a prompt learner from a saved prompt or a reference implementation's checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

from vlprompt.backbones import check_backbone_identity
from vlprompt.prompts import PromptLearner
from vlprompt.prompts.io import read_prompt_config, read_prompt_tensors

__all__ = ["load_initial_prompt"]

log = logging.getLogger(__name__)


@runtime_checkable
class DasslImport(Protocol):
    """A prompt learner that can read the checkpoint of a reference implementation (Dassl: the
    CoOp/CoCoOp/MaPLe code)."""

    def load_dassl_checkpoint(self, path: str | Path) -> None: ...


def load_initial_prompt(learner: PromptLearner, path: str | Path) -> None:
    """Copy into ``learner`` the tensors of a saved vlprompt prompt (a directory) or of a Dassl
    checkpoint of the CoOp/CoCoOp/MaPLe reference code (a file, for learners with
    ``load_dassl_checkpoint``). The learner keeps its classes.

    A saved prompt must come from the same backbone, and its learned tensors must match the
    learner's one for one (names and shapes): a prompt of another method or other settings is
    accepted when they do (MVLPT initialises a target prompt from a source prompt that way),
    with a warning, and refused with what differs otherwise.
    """
    from vlprompt.zoo import resolve_prompt_dir

    path = resolve_prompt_dir(path)
    if path.is_dir():
        config = read_prompt_config(path)
        check_backbone_identity(config["backbone"], learner.backbone.identity, what=f"initial prompt {path}")
        saved = read_prompt_tensors(path)
        learner.match_saved(config)
        own = learner.state_dict()
        shapes = {k: tuple(v.shape) for k, v in saved.items()}
        wanted = {k: tuple(v.shape) for k, v in own.items()}
        if shapes != wanted:
            differ = sorted(k for k in set(shapes) | set(wanted) if shapes.get(k) != wanted.get(k))
            raise ValueError(
                f"{path} holds a {config['method']!r} prompt whose tensors do not match this {learner.name!r} "
                f"prompt: " + "; ".join(f"{k}: saved {shapes.get(k)}, here {wanted.get(k)}" for k in differ[:8]))
        if (config["method"], config["hparams"]) != (learner.name, json.loads(json.dumps(learner.hparams))):
            log.warning("initialising a %s prompt from a %s prompt with other settings (%s); its tensors match",
                        learner.name, config["method"], path)
        learner.load_state_dict({k: v.to(own[k].dtype) for k, v in saved.items()})
    elif not path.exists():
        raise FileNotFoundError(f"initial prompt {path} does not exist")
    elif isinstance(learner, DasslImport):
        learner.load_dassl_checkpoint(path)
    else:
        raise ValueError(f"{path} is not a saved prompt directory, and {learner.name} cannot import checkpoint files")
    log.info("initialised the %s prompt from %s", learner.name, path)
