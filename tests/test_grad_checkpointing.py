"""Gradient checkpointing in the prompted block loops: same features, same prompt gradients."""

from __future__ import annotations

import pytest
import torch

import vlprompt.backbones.vision as vision
from conftest import make_backbone
from vlprompt.methods import prompt_logits
from vlprompt.prompts import MaPLePromptLearner, VPTPromptLearner


def _loss_and_grads(backbone, factory):
    torch.manual_seed(1)
    learner = factory(backbone)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(prompt_logits(learner(images=images), backbone), torch.tensor([0, 1, 0]))
    loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    return loss.detach(), {n: p.grad.clone() for n, p in learner.named_parameters()}


@pytest.mark.parametrize("factory", [
    lambda b: MaPLePromptLearner(b, ["cat", "dog"], depth=3),
    lambda b: VPTPromptLearner(b, ["cat", "dog"], n_tokens=2, depth=3, placement="after_cls"),
], ids=["maple-deep-text-and-vision", "vpt-deep"])
def test_checkpointing_changes_nothing_but_memory(tmp_path, factory, monkeypatch):
    plain = make_backbone(tmp_path / "a", seed=0)
    checkpointed = make_backbone(tmp_path / "b", seed=0, grad_checkpointing=True)
    same = lambda identity: {k: v for k, v in identity.items() if k != "name"}  # noqa: E731 (two folders)
    assert same(plain.identity) == same(checkpointed.identity)  # a prompt trained either way loads the other
    calls = []
    original = vision.checkpoint
    monkeypatch.setattr(vision, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    loss, grads = _loss_and_grads(plain, factory)
    assert not calls
    loss_cp, grads_cp = _loss_and_grads(checkpointed, factory)
    assert calls  # every prompted block went through checkpointing
    assert torch.allclose(loss, loss_cp, atol=1e-6)
    assert grads.keys() == grads_cp.keys()
    assert all(torch.allclose(grads[k], grads_cp[k], atol=1e-6) for k in grads)
    calls.clear()
    with torch.no_grad():  # nothing to recompute without autograd
        factory(checkpointed)(images=torch.zeros(1, 3, 32, 32))
    assert not calls
