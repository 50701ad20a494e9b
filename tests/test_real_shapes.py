"""The same prompt code on the real architectures' shapes (random weights, no download)."""

from __future__ import annotations

import pytest
import torch

from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.prompts import PROMPT_LEARNERS

SHAPES = {  # model: (text width, vision width, layers of the image tower)
    "ViT-B-32": (512, 768, 12),
    "ViT-B-16": (512, 768, 12),
    "ViT-L-14": (768, 1024, 24),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(SHAPES))
def test_every_learner_runs_on_the_real_shapes(model):
    torch.manual_seed(0)
    backbone = OpenCLIPBackbone(model)
    text_width, vision_width, vision_layers = SHAPES[model]
    assert (backbone.text_width, backbone.vision_width, backbone.vision_layers) == SHAPES[model]
    size = backbone.preprocess_cfg["size"]
    image = torch.randn(1, 3, *(size if isinstance(size, (tuple, list)) else (size, size)))
    for name, cls in sorted(PROMPT_LEARNERS.items()):
        learner = cls(backbone, ["cat", "dog"])
        with torch.no_grad():
            out = learner(images=image)
        assert out.image_features.shape == (1, backbone.embed_dim), name
        assert out.text_features.shape[-2:] == (2, backbone.embed_dim), name
    maple = PROMPT_LEARNERS["maple"](backbone, ["cat"])
    assert maple.proj.weight.shape == (vision_width, text_width)
    assert len(maple.visual_prompts()) == 9
    assert PROMPT_LEARNERS["vpt"](backbone, ["cat"]).prompts.shape == (vision_layers, 8, vision_width)
