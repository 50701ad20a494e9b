"""Saved prompts: a directory with ``config.json`` and ``prompt.safetensors``. No pickle."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import load_file, save_file

import vlprompt
from vlprompt.backbones import Backbone, check_backbone_identity
from vlprompt.prompts.base import PromptLearner, get_prompt_learner

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "average_prompts",
    "backbone_from_identity",
    "load_prompt",
    "read_prompt_config",
    "read_prompt_tensors",
    "save_prompt",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "prompt.safetensors"
_FORMAT = "vlprompt-prompt"


def save_prompt(
    learner: PromptLearner,
    directory: str | Path,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save the learnable tensors of ``learner`` and what is needed to rebuild it.

    Refuses to replace an existing non-empty directory unless ``overwrite=True``; the new
    directory is written next to the target and moved into place, so an interrupted save never
    leaves a half-written prompt behind.
    """
    config = {
        "format": _FORMAT,
        "format_version": 1,
        "method": learner.name,
        "hparams": learner.hparams,
        "classnames": learner.classnames,
        "backbone": learner.backbone.identity,
        "vlprompt_version": vlprompt.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metadata": metadata or {},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in learner.state_dict().items()}
    _write_prompt(Path(directory), config, tensors, overwrite)
    log.info("saved %s prompt (%d tensors) to %s", learner.name, len(tensors), directory)
    return directory


def _write_prompt(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], overwrite: bool) -> None:
    """Write a prompt directory next to its target and move it into place, so an interrupted save
    never leaves a half-written prompt; an existing non-empty directory only with ``overwrite``."""
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} already exists and is not empty; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": _FORMAT})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_prompt_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The learned tensors of a saved prompt (safetensors, no pickle)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved prompt: {WEIGHTS_NAME} is missing")
    return load_file(str(path))


def average_prompts(directories: Sequence[str | Path], out: str | Path, *, overwrite: bool = False) -> Path:
    """Average saved prompts element-wise into one (MVLPT's source prompt: the prompts of several
    seeds averaged), saved at ``out`` with the first prompt's method, settings and classes.

    The prompts must come from the same method with the same settings on the same backbone, with
    tensors of the same shapes; anything else is refused with what differs.
    """
    if not directories:
        raise ValueError("average_prompts needs at least one saved prompt")
    configs = [read_prompt_config(d) for d in directories]
    tensors = [read_prompt_tensors(d) for d in directories]
    first, reference = configs[0], tensors[0]
    for directory, config, state in zip(directories[1:], configs[1:], tensors[1:]):
        where = f"{directory} vs {directories[0]}"
        check_backbone_identity(first["backbone"], config["backbone"], what=f"prompt {directory}")
        if (config["method"], config["hparams"]) != (first["method"], first["hparams"]):
            raise ValueError(f"cannot average prompts of different methods or settings ({where}): "
                             f"{config['method']} {config['hparams']} vs {first['method']} {first['hparams']}")
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != {k: tuple(v.shape) for k, v in reference.items()}:
            raise ValueError(f"cannot average prompts whose tensors differ ({where}): {shapes}")
    mean = {k: torch.stack([state[k].float() for state in tensors]).mean(0).to(v.dtype).contiguous()
            for k, v in reference.items()}
    config = {**first, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "metadata": {**first.get("metadata", {}), "averaged_from": [str(Path(d)) for d in directories]}}
    _write_prompt(Path(out), config, mean, overwrite)
    log.info("averaged %d %s prompts into %s", len(directories), first["method"], out)
    return Path(out)


def read_prompt_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a saved prompt, validated."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved prompt: {CONFIG_NAME} is missing")
    config = json.loads(path.read_text())
    if config.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a vlprompt prompt config (format={config.get('format')!r})")
    return config


def backbone_from_identity(identity: dict[str, Any]) -> Backbone:
    """Build the backbone a saved prompt records (``config.json`` -> ``backbone``: type, name,
    pretrained) through the backbone registry (:func:`vlprompt.backbones.backbone_from_identity`).
    Embedded ``zoo:`` models and local files work offline; pretrained tags need the open_clip /
    Hugging Face cache or the network."""
    from vlprompt.backbones import registry

    return registry.backbone_from_identity(identity)


def load_prompt(
    directory: str | Path,
    backbone: Backbone | None = None,
    *,
    classnames: list[str] | None = None,
    strict: bool = True,
) -> PromptLearner:
    """Rebuild a saved prompt on ``backbone`` (default: the backbone the prompt records, see
    :func:`backbone_from_identity`), optionally for other ``classnames``.

    Raises :class:`~vlprompt.backbones.BackboneMismatchError` when the prompt was learned on a
    different encoder (``strict=False`` downgrades a weights-only mismatch to a warning).
    """
    config = read_prompt_config(directory)
    if backbone is None:
        backbone = backbone_from_identity(config["backbone"])
    try:
        check_backbone_identity(config["backbone"], backbone.identity)
    except ValueError as err:
        shapes_agree = all(
            config["backbone"].get(k) == backbone.identity.get(k) for k in ("text_width", "embed_dim", "vision_width")
        )
        if strict or not shapes_agree:
            raise
        log.warning("%s", err)
    cls = get_prompt_learner(config["method"])
    learner = cls(backbone, config["classnames"], **config["hparams"])
    state = read_prompt_tensors(directory)
    missing, unexpected = learner.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: saved tensors do not fit {cls.__name__} (missing {missing}, unexpected {unexpected})")
    if classnames is not None:
        learner.set_classnames(classnames)
    return learner
