"""The one registry of backbone families: how a model name and a saved prompt's backbone identity
become a :class:`~vlprompt.backbones.Backbone`.

Each family registers itself with one line at the bottom of its own file::

    register_backbone("hf_clip", HFCLIPBackbone, prefix="hf:", load=_load)

``load_backbone("hf:FOLDER")`` then picks the family by the name's prefix (the family without a
prefix takes every other name), and a saved prompt's ``config.json`` finds it again by the class
name its identity records (``"type": "HFCLIPBackbone"``), so prompts saved before the registry
existed keep loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlprompt.backbones.base import Backbone

__all__ = ["BackboneFamily", "backbone_families", "backbone_from_identity", "load_backbone", "register_backbone"]

log = logging.getLogger(__name__)

#: ``load(name, pretrained)``: the family's backbone for a model name and weights.
Loader = Callable[[str, "str | None"], "Backbone"]


@dataclass(frozen=True)
class BackboneFamily:
    """One family of encoders: ``cls`` (its class name is the ``type`` a saved prompt records),
    ``load`` (name, pretrained -> backbone) and the name ``prefix`` that selects it in
    :func:`load_backbone` (None: the default family, for names without a registered prefix)."""

    name: str
    cls: type
    load: Loader
    prefix: str | None = None


_FAMILIES: dict[str, BackboneFamily] = {}


def register_backbone(name: str, cls: type, *, prefix: str | None = None, load: Loader | None = None) -> None:
    """Register a backbone family (one line in the family's own file). ``load`` defaults to
    ``cls(name, pretrained)``."""
    for other in _FAMILIES.values():
        if other.name != name and (other.cls.__name__ == cls.__name__ or other.prefix == prefix):
            what = f"prefix {prefix!r}" if other.prefix == prefix else f"class name {cls.__name__!r}"
            raise ValueError(f"backbone family {name!r}: {what} is already taken by family {other.name!r}")
    _FAMILIES[name] = BackboneFamily(name, cls, load or (lambda model, pretrained: cls(model, pretrained)), prefix)


def backbone_families() -> dict[str, BackboneFamily]:
    """The registered families by name."""
    return dict(_FAMILIES)


def _family_for_name(name: str) -> BackboneFamily:
    for family in _FAMILIES.values():
        if family.prefix is not None and name.startswith(family.prefix):
            return family
    default = next((f for f in _FAMILIES.values() if f.prefix is None), None)
    if default is None:
        prefixes = ", ".join(f.prefix for f in _FAMILIES.values() if f.prefix)
        raise ValueError(f"no backbone family takes {name!r} (registered prefixes: {prefixes or 'none'})")
    return default


def load_backbone(name: str, pretrained: str | None = None) -> Backbone:
    """The backbone ``name`` names: ``hf:ID_OR_FOLDER`` for a transformers CLIP/CLIPSeg model,
    ``timm:NAME`` for a vision-only timm ViT, anything else an open_clip model (a model name,
    ``local-dir:FOLDER`` or ``zoo:NAME``) with its ``pretrained`` tag or checkpoint; each family
    registers its prefix (:func:`register_backbone`)."""
    return _family_for_name(name).load(name, pretrained)


def backbone_from_identity(identity: dict[str, Any]) -> Backbone:
    """Build the backbone a saved prompt records (``config.json`` -> ``backbone``: type, name,
    pretrained); a record without a type is an open_clip one (the first saved prompts)."""
    kind = identity.get("type", "OpenCLIPBackbone")
    family = next((f for f in _FAMILIES.values() if f.cls.__name__ == kind), None)
    if family is None:
        raise ValueError(f"cannot rebuild a {kind!r} backbone from a saved prompt; pass backbone=")
    if not identity.get("name"):
        raise ValueError("the saved prompt does not record its backbone's model name; pass backbone=")
    log.info("rebuilding the prompt's backbone: %s %s (pretrained=%s)", kind, identity["name"],
             identity.get("pretrained"))
    return family.load(identity["name"], identity.get("pretrained"))
