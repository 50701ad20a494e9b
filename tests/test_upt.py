"""UPT: one unified prompt drives both towers."""

from __future__ import annotations

import torch

from vlprompt.prompts import UPTPromptLearner


def test_one_prompt_feeds_both_towers(backbone):
    upt = UPTPromptLearner(backbone, ["cat", "dog"], n_ctx=3, depth=2, heads=2)
    assert upt.unified_prompts().shape == (2, 3, backbone.text_width)
    x = torch.randn(2, 3, 32, 32)
    text, image = upt.text_features().detach(), upt.encode_images(x).detach()
    with torch.no_grad():
        upt.deep_ctx.add_(torch.randn_like(upt.deep_ctx))  # the deep unified tokens
    assert not torch.allclose(upt.text_features(), text)
    assert not torch.allclose(upt.encode_images(x), image)


def test_tokens_of_all_layers_attend_to_each_other(backbone):
    upt = UPTPromptLearner(backbone, ["cat"], n_ctx=2, depth=2)
    first = upt.unified_prompts()[0].detach()
    with torch.no_grad():
        upt.deep_ctx.add_(torch.randn_like(upt.deep_ctx))
    assert not torch.allclose(upt.unified_prompts()[0], first)  # layer 0 sees layer 1's tokens
