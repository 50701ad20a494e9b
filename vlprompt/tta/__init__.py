"""Test-time adaptation parts: conventional and diffusion views, their cache, the cosine filter,
confidence selection and the entropy objective.

Names are imported on first use (PEP 562); ``diffusers`` itself only when a diffusion generator
is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module defining it
_EXPORTS = {
    "DiffusionViews": "diffusion",
    "ImageVariationGenerator": "diffusion",
    "SDEditGenerator": "diffusion",
    "ViewCache": "diffusion",
    "ViewGenerator": "diffusion",
    "image_digest": "diffusion",
    "TestTimeViews": "views",
    "confident_views": "views",
    "marginal_entropy": "views",
    "similar_views": "views",
}

__all__ = [
    "DiffusionViews",
    "ImageVariationGenerator",
    "SDEditGenerator",
    "TestTimeViews",
    "ViewCache",
    "ViewGenerator",
    "confident_views",
    "image_digest",
    "marginal_entropy",
    "similar_views",
]

if TYPE_CHECKING:
    from vlprompt.tta.diffusion import (
        DiffusionViews,
        ImageVariationGenerator,
        SDEditGenerator,
        ViewCache,
        ViewGenerator,
        image_digest,
    )
    from vlprompt.tta.views import TestTimeViews, confident_views, marginal_entropy, similar_views


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
