"""Intermediate image-tower layers for segmentation decoders: equal to the tower's own activations,
prompts removed, blocks after the deepest layer not run."""

from __future__ import annotations

import pytest
import torch


def _images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_layers_equal_the_towers_own_activations(backbone):
    blocks = backbone.model.visual.transformer.resblocks
    seen: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            backbone.model.encode_image(_images())
            own = {i: (t if backbone.model.visual.transformer.batch_first else t.transpose(0, 1)).clone() for i, t in seen.items()}
            seen.clear()
            layers = backbone.encode_image_layers(_images(), [2, 0])
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == [0, 1, 2]  # every block up to the deepest asked for, no further
    assert torch.allclose(layers[0], own[2], atol=1e-6) and torch.allclose(layers[1], own[0], atol=1e-6)
    grid = (32 // backbone.patch_size[0]) * (32 // backbone.patch_size[1])
    assert layers[0].shape == (2, backbone.vision_prefix_tokens + grid, backbone.vision_width)


def test_visual_prompts_are_removed_but_change_the_tokens(backbone):
    torch.manual_seed(0)
    prompts = [torch.randn(3, backbone.vision_width) for _ in range(2)]
    with torch.no_grad():
        plain = backbone.encode_image_layers(_images(), [1])[0]
        prompted = backbone.encode_image_layers(_images(), [1], prompts)[0]
        after_patches = backbone.encode_image_layers(_images(), [1], prompts, placement="after_patches")[0]
    assert prompted.shape == plain.shape == after_patches.shape
    assert not torch.allclose(prompted, plain) and not torch.allclose(after_patches, prompted)
    prompts[0].requires_grad_(True)
    backbone.encode_image_layers(_images(), [1], prompts)[0].sum().backward()
    assert prompts[0].grad is not None and prompts[0].grad.abs().sum() > 0


def test_bad_layers_are_refused(backbone):
    with pytest.raises(ValueError, match="block indices 0..2"):
        backbone.encode_image_layers(_images(), [3])
    with pytest.raises(ValueError, match="block indices"):
        backbone.encode_image_layers(_images(), [])
