"""KgCoOp: the knowledge-guided term vanishes at the hand-written prompt and pulls back to it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlprompt.prompts import KgCoOpPromptLearner


def test_loss_is_zero_at_initialisation_from_the_hand_written_prompt(backbone):
    kg = KgCoOpPromptLearner(backbone, ["cat", "golden retriever"], ctx_init="a photo of a", templates="a photo of a {}.")
    out = kg()
    assert abs(kg.extra_loss(out, None, None).item()) < 1e-6
    with torch.no_grad():
        kg.ctx.add_(0.3 * torch.randn_like(kg.ctx))
    moved = kg.extra_loss(kg(), None, None)
    assert moved > 1e-4
    moved.backward()
    assert kg.ctx.grad.abs().sum() > 0


def test_loss_is_weight_times_one_minus_mean_cosine(backbone):
    kg = KgCoOpPromptLearner(backbone, ["cat", "dog"], ctx_init=None, n_ctx=3, weight=2.5)
    out = kg()
    frozen = F.normalize(backbone.encode_text(["a photo of a cat.", "a photo of a dog."]), dim=-1)
    cos = F.cosine_similarity(out.text_features, frozen, dim=-1)
    assert torch.allclose(kg.extra_loss(out, None, None), 2.5 * (1 - cos.mean()), atol=1e-6)
