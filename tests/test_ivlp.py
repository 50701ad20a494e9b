"""IVLP: independent deep prompts per tower; depths checked against the model."""

from __future__ import annotations

import pytest
import torch

# Perturbations are random: a constant shift of a token is invisible through LayerNorm.

from vlprompt.prompts import IVLPPromptLearner
from vlprompt.prompts.ivlp import PAPER_DEPTH


def test_towers_are_prompted_independently(backbone):
    ivlp = IVLPPromptLearner(backbone, ["cat", "dog"], text_depth=3, vision_depth=2)
    x = torch.randn(2, 3, 32, 32)
    text, image = ivlp.text_features().detach(), ivlp.encode_images(x).detach()
    with torch.no_grad():
        ivlp.vision_prompts.add_(torch.randn_like(ivlp.vision_prompts))
    assert torch.equal(ivlp.text_features(), text) and not torch.allclose(ivlp.encode_images(x), image)
    image = ivlp.encode_images(x).detach()
    with torch.no_grad():
        ivlp.text_prompts[1].add_(torch.randn_like(ivlp.text_prompts[1]))  # the prompt before text layer 2
    assert torch.equal(ivlp.encode_images(x), image) and not torch.allclose(ivlp.text_features(), text)


def test_depth_defaults_to_the_paper_capped_at_the_tower(backbone):
    ivlp = IVLPPromptLearner(backbone, ["cat"])
    assert ivlp.hparams["text_depth"] is None  # recorded as given; resolved the same way on load
    assert min(PAPER_DEPTH, backbone.text_layers) == 3
    assert ivlp.vision_prompts.shape == (3, 4, backbone.vision_width)
    assert ivlp.text_prompts.shape == (2, 4, backbone.text_width)
    text_only = IVLPPromptLearner(backbone, ["cat"], vision_depth=0)
    assert not hasattr(text_only, "vision_prompts")
    with pytest.raises(ValueError, match="text tower's 3 layers"):
        IVLPPromptLearner(backbone, ["cat"], text_depth=4)
    with pytest.raises(ValueError, match="image tower's 3 layers"):
        IVLPPromptLearner(backbone, ["cat"], vision_depth=4)


def test_same_code_runs_on_differently_shaped_towers(tmp_path):
    from conftest import TINY_CLIP, make_backbone

    wide = {**TINY_CLIP, "embed_dim": 16,
            "vision_cfg": {**TINY_CLIP["vision_cfg"], "width": 64, "layers": 5, "patch_size": 16},
            "text_cfg": {**TINY_CLIP["text_cfg"], "width": 32, "layers": 2}}
    bb = make_backbone(tmp_path, wide)
    ivlp = IVLPPromptLearner(bb, ["cat", "dog"], n_vision_tokens=3)
    out = ivlp(images=torch.randn(2, 3, 32, 32))
    assert out.image_features.shape == (2, 16) and out.text_features.shape == (2, 16)
    assert ivlp.vision_prompts.shape == (5, 3, 64) and ivlp.text_prompts.shape == (1, 4, 32)
