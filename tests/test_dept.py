"""DePT: a short soft prompt plus a low-rank update of the frozen prompt tokens (B starts at zero),
the parameter budget of 16-token CoOp, exact truncation on causal towers, two learning rates."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CLIP, make_backbone
from vlprompt.methods import PromptClassifier
from vlprompt.prompts import CoOpPromptLearner, DePTPromptLearner
from vlprompt.prompts.dept import matching_rank

NAMES = ["red square", "green square", "a rather long blue square name"]


def test_starts_as_coop_and_reproduces_the_hand_written_prompt(backbone):
    dept = DePTPromptLearner(backbone, NAMES, n_ctx=4, ctx_init="a photo of a")
    coop = CoOpPromptLearner(backbone, NAMES, ctx_init="a photo of a")
    with torch.no_grad():
        assert torch.allclose(dept.text_features(), coop.text_features(), atol=1e-6)
        assert torch.allclose(dept.text_features(), backbone.encode_text([f"a photo of a {n}." for n in NAMES]),
                              atol=1e-5)
        dept.lora_B.normal_()
        assert not torch.allclose(dept.text_features(), coop.text_features(), atol=1e-3)


def test_the_update_touches_only_frozen_tokens_by_their_position(backbone):
    torch.manual_seed(0)
    dept = DePTPromptLearner(backbone, NAMES, n_ctx=3)
    with torch.no_grad():
        dept.lora_B.normal_()
        ctx = torch.randn_like(dept.ctx)
        prompts = dept.assemble(ctx)
        plain = CoOpPromptLearner.assemble(dept, ctx)
    update = (dept.lora_A @ dept.lora_B) * dept.scale
    start = backbone.text_start
    assert torch.equal(prompts[:, start:start + 3], plain[:, start:start + 3])  # the soft prompt: untouched
    assert torch.allclose(prompts[:, 0] - plain[:, 0], update[0].expand(3, -1), atol=1e-6)  # start token: row 0
    assert torch.allclose(prompts[:, start + 3] - plain[:, start + 3], update[1].expand(3, -1), atol=1e-6)


def test_exact_truncation_and_gradients_reach_prompt_and_both_factors(tmp_path):
    full = make_backbone(tmp_path / "a", TINY_CLIP, truncate_text=False)
    cut = make_backbone(tmp_path / "b", TINY_CLIP)
    torch.manual_seed(0)
    learner = DePTPromptLearner(cut, NAMES)
    with torch.no_grad():
        learner.lora_B.normal_(std=0.1)
    long = DePTPromptLearner(full, NAMES)
    long.load_state_dict(learner.state_dict())
    assert learner.fixed_embeddings.shape[1] < long.fixed_embeddings.shape[1]  # fewer rows computed
    assert torch.allclose(learner.text_features(), long.text_features(), atol=1e-5)
    learner.text_features().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (learner.ctx, learner.lora_A, learner.lora_B))


def test_parameter_budget_matches_16_token_coop():
    # ViT-B/16's text tower (width 512, 77 positions): 8 tokens and rank 7 are within 1% of CoOp's 8,192.
    rank = matching_rank(8, 77 - 8, 512)
    total = 8 * 512 + rank * (77 - 8 + 512)
    assert rank == 7 and abs(total - 8192) / 8192 < 0.01
    # Elsewhere the rank is the one whose count is closest to the budget.
    for width, length in ((768, 77), (48, 32), (1024, 77)):
        counts = {r: 8 * width + r * (length - 8 + width) for r in range(1, 40)}
        best = min(counts, key=lambda r: abs(counts[r] - 16 * width))
        assert matching_rank(8, length - 8, width) == best


def test_two_learning_rates_through_the_optimiser(backbone):
    model = PromptClassifier(backbone, lambda b, names: DePTPromptLearner(b, names, lowrank_lr=0.5), NAMES,
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.01), lr_scheduler="constant")
    optimizer = model.configure_optimizers()
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs == [0.01, 0.5]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(model.prompt_learner.lora_A),
                                                                   id(model.prompt_learner.lora_B)}
    with pytest.raises(ValueError, match="rank must be"):
        DePTPromptLearner(backbone, NAMES, rank=0)
