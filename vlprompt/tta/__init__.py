"""Test-time adaptation parts: conventional and diffusion views, their cache, the cosine filter,
confidence selection and the entropy objective."""

from vlprompt.tta.diffusion import (
    DiffusionViews,
    ImageVariationGenerator,
    SDEditGenerator,
    ViewCache,
    ViewGenerator,
    image_digest,
)
from vlprompt.tta.views import TestTimeViews, confident_views, marginal_entropy, similar_views

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
