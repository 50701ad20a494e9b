"""MaPLe: visual prompts are functions of the language prompts; reference checkpoints load."""

from __future__ import annotations

import pytest
import torch

from vlprompt.prompts import CoOpPromptLearner, MaPLePromptLearner, ZeroShotPrompt


def test_vision_prompts_follow_the_language_prompts(backbone):
    maple = MaPLePromptLearner(backbone, ["cat", "dog"], depth=3)
    x = torch.randn(2, 3, 32, 32)
    before_prompts = [p.detach().clone() for p in maple.visual_prompts()]
    before_images = maple.encode_images(x).detach()
    with torch.no_grad():
        maple.compound_prompts_text[1].add_(torch.randn_like(maple.compound_prompts_text[1]))  # a language prompt only
    after = maple.visual_prompts()
    assert torch.equal(after[0], before_prompts[0]) and torch.equal(after[1], before_prompts[1])
    assert not torch.allclose(after[2], before_prompts[2])
    assert not torch.allclose(maple.encode_images(x), before_images)
    with torch.no_grad():
        maple.ctx.add_(torch.randn_like(maple.ctx))  # the input context drives the first visual prompt
    assert not torch.allclose(maple.visual_prompts()[0], before_prompts[0])


def test_coupling_functions_start_equal_and_count_matches_the_paper_formula(backbone):
    maple = MaPLePromptLearner(backbone, ["cat", "dog"], depth=3)
    first, second = maple.compound_prompt_projections
    assert torch.equal(first.weight, second.weight) and first.weight.data_ptr() != second.weight.data_ptr()
    t, v, n, depth = backbone.text_width, backbone.vision_width, maple.n_ctx, 3
    assert maple.num_learnable_parameters() == n * t + depth * (t * v + v) + (depth - 1) * n * t


def test_learns_the_first_tokens_of_the_init_and_keeps_the_rest(backbone):
    names = ["cat", "golden retriever"]
    maple = MaPLePromptLearner(backbone, names, n_ctx=2, depth=1)
    assert maple.ctx.shape == (2, backbone.text_width)
    # Before training, "a photo" + fixed "of a" is exactly the hand-written prompt: features of size ~4
    # through the shared-prefix path, so float32 sums in another order (~1e-6).
    assert torch.allclose(maple.text_features(), ZeroShotPrompt(backbone, names).text_features(), atol=1e-5)
    with pytest.raises(ValueError, match="splits a word"):
        CoOpPromptLearner(backbone, names, n_ctx=2, ctx_init="qwertyuiop photo")  # a 4-token word
    with pytest.raises(ValueError, match="class_token_position='end'"):
        CoOpPromptLearner(backbone, names, n_ctx=2, ctx_init="a photo of a", class_token_position="front")


def test_loads_a_reference_checkpoint(backbone, tmp_path):
    source = MaPLePromptLearner(backbone, ["cat", "dog"], depth=3)
    state = {f"prompt_learner.{k}": v.half() + 0.25 for k, v in source.state_dict().items()}
    state["prompt_learner.token_prefix"] = torch.zeros(2, 1, backbone.text_width)  # reference buffers
    torch.save({"state_dict": state, "epoch": 5}, tmp_path / "model.pth.tar-5")
    target = MaPLePromptLearner(backbone, ["cat", "dog"], depth=3)
    target.load_dassl_checkpoint(tmp_path / "model.pth.tar-5")
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[f"prompt_learner.{k}"].float())
    with pytest.raises(KeyError, match="not a MaPLe checkpoint"):
        MaPLePromptLearner(backbone, ["cat", "dog"], depth=2).load_dassl_checkpoint(tmp_path / "model.pth.tar-5")
