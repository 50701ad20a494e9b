"""Checkpoints that hold what was learned only: the frozen encoder (and any frozen head) is left out
when saving and taken from the module being loaded into, and a record names the backbone and the
prompt so that a checkpoint is refused on another encoder."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from torch import nn

from vlprompt.backbones import Backbone, check_backbone_identity
from vlprompt.prompts import PromptLearner

__all__ = ["check_record", "prompt_record", "restore_frozen", "strip_frozen"]


def strip_frozen(checkpoint: dict[str, Any], frozen: Iterable[str]) -> None:
    """Drop the state of the submodules named ``frozen`` from ``checkpoint``."""
    prefixes = tuple(f"{name}." for name in frozen)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefixes)}


def restore_frozen(checkpoint: dict[str, Any], module: nn.Module, frozen: Iterable[str]) -> None:
    """Put the state of ``module``'s submodules named ``frozen`` (as it was built) into ``checkpoint``,
    which does not hold them."""
    for name in frozen:
        checkpoint["state_dict"].update({f"{name}.{k}": v for k, v in module.get_submodule(name).state_dict().items()})


def prompt_record(backbone: Backbone, learner: PromptLearner, *, full: bool = True) -> dict[str, Any]:
    """The ``vlprompt`` entry of a checkpoint: the backbone's identity and the prompt's method, and
    unless ``full`` is False its hyper-parameters (plain types only) and class names."""
    record: dict[str, Any] = {"backbone": backbone.identity, "method": learner.name}
    if full:
        record["hparams"] = json.loads(json.dumps(learner.hparams, default=str))
        record["classnames"] = learner.classnames
    return record


def check_record(checkpoint: dict[str, Any], backbone: Backbone, learner: PromptLearner | None = None) -> None:
    """Refuse a checkpoint made on another backbone, or (given ``learner``) for another prompt."""
    info = checkpoint.get("vlprompt", {})
    if "backbone" in info:
        check_backbone_identity(info["backbone"], backbone.identity, what="checkpoint")
    if learner is not None and "hparams" in info:
        learner.match_saved(info)
