"""``compile_towers``: the compiled towers give the features and gradients of the plain ones, and
the backbone's identity (what a saved prompt records) does not change."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_backbone
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.prompts import PROMPT_LEARNERS


@pytest.mark.slow
def test_compiled_towers_match_the_plain_ones(tmp_path):
    plain = make_backbone(tmp_path, seed=0)
    compiled = OpenCLIPBackbone.from_model(copy.deepcopy(plain.model), plain.tokenizer, name=plain.model_name,
                                           pretrained=plain.pretrained, compile_towers=True)
    assert compiled.identity == {**plain.identity}
    images = torch.randn(2, 3, 32, 32)
    for method in ("coop", "maple"):
        torch.manual_seed(0)
        compiled_matches_plain(PROMPT_LEARNERS[method](plain, ["cat", "red square", "dog"]), plain, compiled, images)


def compiled_matches_plain(learner, plain, compiled, images, feature_atol: float = 1e-5) -> None:
    """``learner``'s features and prompt gradients on the compiled towers equal those on the plain ones."""
    outputs = {}
    for name, backbone in (("plain", plain), ("compiled", compiled)):
        learner.backbone = backbone
        learner.zero_grad()
        out = learner(images=images)
        (out.image_features.sum() + out.text_features.pow(2).sum()).backward()
        grads = [p.grad.clone() for p in learner.parameters() if p.grad is not None]
        outputs[name] = (out.image_features.detach(), out.text_features.detach(), grads)
    learner.backbone = plain
    for ours, theirs in zip(outputs["compiled"][:2], outputs["plain"][:2]):
        torch.testing.assert_close(ours, theirs, atol=feature_atol, rtol=1e-4)
    for ours, theirs in zip(outputs["compiled"][2], outputs["plain"][2]):
        # fused kernels sum in another order: compare at the gradient's own scale
        torch.testing.assert_close(ours, theirs, atol=1e-4 * float(theirs.abs().max()), rtol=1e-3)
