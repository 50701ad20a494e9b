"""MVLPT's UPT as its code runs it (``MultitaskVLPromptLearner.forward_mvlpt_proj`` in
sIncerass/MVLPT ``trainers/mvlpt.py``): text and visual tokens mapped to 128 wide, through one CLIP
block that sees each token as a sequence of length 1 (so they never exchange information), mapped
back; visual tokens at every image layer after the pre-norm, the text context CoOp's."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from conftest import TINY_CLIP, make_backbone
from test_mvlpt_visual_prompts import mvlpt_image_features
from vlprompt.prompts import CoOpPromptLearner
from vlprompt.prompts.upt import MVLPTUPTPromptLearner

NAMES = ["cat", "dog", "golden retriever"]


def _learner(tmp_path, **kwargs):
    backbone = make_backbone(tmp_path, TINY_CLIP).to(torch.float64)
    torch.manual_seed(0)
    learner = MVLPTUPTPromptLearner(backbone, NAMES, **kwargs).to(torch.float64)
    with torch.no_grad():  # biases and norms away from their zero/one init, so they are exercised
        for p in learner.mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return learner


def clip_block_on_one_token(block, x):
    """CLIP's ResidualAttentionBlock (one head) on a sequence of length 1: the softmax over one key
    is 1, so attention returns the token's own value, projected."""
    d = x.shape[-1]
    w_v, b_v = block.self_attn.in_proj_weight[2 * d:], block.self_attn.in_proj_bias[2 * d:]
    h = F.layer_norm(x, (d,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    x = x + block.self_attn.out_proj(h @ w_v.T + b_v)
    h = F.layer_norm(x, (d,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    h = block.linear1(h)
    return x + block.linear2(h * torch.sigmoid(1.702 * h))


def mvlpt_mixed(learner):
    """forward_mvlpt_proj written out: pre-maps, the block per token, post-maps, split."""
    coop = learner.text_in(learner.ctx.reshape(1, -1, learner.ctx.shape[-1]))
    vpt = learner.vision_in(learner.visual_ctx.reshape(1, -1, learner.visual_ctx.shape[-1]))
    mixed = clip_block_on_one_token(learner.mixer, torch.cat([coop, vpt], dim=1))
    n = coop.shape[1]
    text = learner.text_out(mixed[:, :n]).reshape(-1, learner.n_ctx, learner.ctx.shape[-1]).squeeze(0)
    visual = learner.vision_out(mixed[:, n:]).reshape(-1, *learner.visual_ctx.shape[1:])
    return text, visual


def test_the_block_sees_each_token_alone(tmp_path):
    learner = _learner(tmp_path)
    text, visual = learner.mixed_prompts()
    want_text, want_visual = mvlpt_mixed(learner)
    torch.testing.assert_close(text, want_text, rtol=0, atol=1e-12)
    torch.testing.assert_close(visual, want_visual, rtol=0, atol=1e-12)


def test_text_and_visual_tokens_never_exchange_information(tmp_path):
    learner = _learner(tmp_path)
    text, visual = learner.mixed_prompts()
    with torch.no_grad():
        learner.ctx.add_(1.0)
    text2, visual2 = learner.mixed_prompts()
    assert torch.equal(visual2, visual) and not torch.allclose(text2, text)
    with torch.no_grad():
        learner.visual_ctx[1:].mul_(3.0)  # the deep tokens only
    text3, visual3 = learner.mixed_prompts()
    assert torch.equal(text3, text2) and torch.equal(visual3[0], visual2[0]) and not torch.allclose(visual3, visual2)


def test_features_are_mvlpts(tmp_path):
    learner = _learner(tmp_path)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    text, visual = mvlpt_mixed(learner)
    out = learner(images=images)
    want = mvlpt_image_features(learner.backbone.model.visual, images, list(visual))
    torch.testing.assert_close(out.image_features, want, rtol=0, atol=1e-12)
    coop = CoOpPromptLearner(learner.backbone, NAMES, n_ctx=4, class_token_position="middle").to(torch.float64)
    with torch.no_grad():
        coop.ctx.copy_(text)
    torch.testing.assert_close(out.text_features, coop.text_features(), rtol=0, atol=1e-12)


def test_mvlpts_layout_and_initialisation(tmp_path):
    learner = _learner(tmp_path)
    bb = learner.backbone
    assert learner.ctx.shape == (4, bb.text_width) and learner.visual_ctx.shape == (bb.vision_layers, 4, bb.vision_width)
    assert learner.placement == "after_cls_after_pre_norm" and learner.class_token_position == "middle"
    val = math.sqrt(6.0 / (3 * 8 * 8 + bb.vision_width))  # MVLPT's Xavier-uniform range
    assert learner.visual_ctx.abs().max() <= val
    assert learner.text_in.out_features == learner.vision_in.out_features == 128
    narrow = _learner(tmp_path, proj_dim=32, n_tokens=2, vision_depth=1)  # the tower is 32 wide: no map
    assert isinstance(narrow.vision_in, torch.nn.Identity) and narrow.visual_ctx.shape == (1, 2, 32)


def test_gradients_reach_every_learned_tensor_and_no_encoder_weight(tmp_path):
    learner = _learner(tmp_path)
    out = learner(images=torch.randn(2, 3, 32, 32, dtype=torch.float64))
    (out.image_features @ out.text_features.T).sum().backward()
    learned = [n for n, p in learner.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    assert {"ctx", "visual_ctx"} <= set(learned)
    assert all(learner.get_parameter(n).grad is not None for n in learned)
    assert all(p.grad is None for p in learner.backbone.parameters())
