"""Saved prompts: a directory with ``config.json`` and ``prompt.safetensors``. No pickle."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

import vlprompt
from vlprompt.backbones import Backbone, check_backbone_identity
from vlprompt.prompts.base import PromptLearner, get_prompt_learner

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "backbone_from_identity", "load_prompt", "read_prompt_config", "save_prompt"]

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
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} already exists and is not empty; pass overwrite=True to replace it")
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
    log.info("saved %s prompt (%d tensors) to %s", learner.name, len(tensors), directory)
    return directory


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
    pretrained). Embedded ``zoo:`` models and local files work offline; pretrained tags need the
    open_clip / Hugging Face cache or the network."""
    from vlprompt.backbones import OpenCLIPBackbone, TimmBackbone

    kinds = {"OpenCLIPBackbone": OpenCLIPBackbone, "TimmBackbone": TimmBackbone}
    kind = kinds.get(identity.get("type", "OpenCLIPBackbone"))
    if kind is None:
        raise ValueError(f"cannot rebuild a {identity.get('type')!r} backbone from a saved prompt; pass backbone=")
    if not identity.get("name"):
        raise ValueError("the saved prompt does not record its backbone's model name; pass backbone=")
    log.info("rebuilding the prompt's backbone: %s %s (pretrained=%s)", kind.__name__, identity["name"],
             identity.get("pretrained"))
    return kind(identity["name"], identity.get("pretrained"))


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
    state = load_file(str(Path(directory) / WEIGHTS_NAME))
    missing, unexpected = learner.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: saved tensors do not fit {cls.__name__} (missing {missing}, unexpected {unexpected})")
    if classnames is not None:
        learner.set_classnames(classnames)
    return learner
