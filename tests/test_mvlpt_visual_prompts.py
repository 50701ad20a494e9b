"""MVLPT's visual prompts (Shen et al., WACV 2024, ``trainers/mvlpt.py``): tokens that join the image
tower after its pre-norm (``after_cls_after_pre_norm``), deep tokens replaced before every later
block, and the Xavier-uniform draw of the tokens; the other placements unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import TINY_CLIP, make_backbone
from test_visual_prompts import TIMM_TINY
from vlprompt.backbones import TimmBackbone
from vlprompt.prompts import VPTPromptLearner
from vlprompt.prompts.vpt import visual_prompt_tokens, xavier_uniform_bound


@pytest.fixture(scope="module")
def backbone64(tmp_path_factory):
    """The tiny open_clip ViT (3 blocks, width 32, 8-pixel patches) in float64, so the comparisons
    below are exact up to the order of float64 operations."""
    bb = make_backbone(tmp_path_factory.mktemp("mvlpt_vit"), TINY_CLIP)
    return bb.to(torch.float64)


def _embed(visual, images):
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding


def _blocks(visual, x, deep, n):
    """Block 0 as it is, then before block i (1..) the n tokens after the class token replaced by
    ``deep[i - 1]``: MVLPT's ``ImageEncoder.forward``."""
    for i, block in enumerate(visual.transformer.resblocks):
        if i >= 1 and i - 1 < len(deep):
            x = torch.cat([x[:, :1], deep[i - 1].expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)
        x = block(x) if visual.transformer.batch_first else block(x.transpose(0, 1)).transpose(0, 1)
    return x


def _head(visual, x):
    return visual.ln_post(x[:, 0]) @ visual.proj


def mvlpt_image_features(visual, images, prompts):
    """MVLPT's image encoder written out: embed, ln_pre, the input tokens after the class token,
    the blocks with deep tokens, ln_post of the class token, projection."""
    n = prompts[0].shape[0]
    x = visual.ln_pre(_embed(visual, images))
    x = torch.cat([x[:, :1], prompts[0].expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
    return _head(visual, _blocks(visual, x, prompts[1:], n))


def prenorm_image_features(visual, images, prompts):
    """vlprompt's default ``after_cls``: the tokens join before ln_pre, which normalises them too."""
    n = prompts[0].shape[0]
    x = _embed(visual, images)
    x = visual.ln_pre(torch.cat([x[:, :1], prompts[0].expand(x.shape[0], -1, -1), x[:, 1:]], dim=1))
    return _head(visual, _blocks(visual, x, prompts[1:], n))


def _images(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _prompts(depth, n=2, width=32, seed=1):
    # Small tokens, as trained prompts are (MVLPT draws them within +-0.06 on ViT-B/16): the pre-norm
    # scales them up by far, so the two placements differ clearly.
    g = torch.Generator().manual_seed(seed)
    return [0.05 * torch.randn(n, width, generator=g, dtype=torch.float64) for _ in range(depth)]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_after_pre_norm_is_mvlpts_image_encoder(backbone64, depth):
    prompts = _prompts(depth)
    got = backbone64.encode_image(_images(), prompts, "after_cls_after_pre_norm")
    want = mvlpt_image_features(backbone64.model.visual, _images(), prompts)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth", [1, 3])
def test_the_default_placement_is_unchanged(backbone64, depth):
    prompts = _prompts(depth)
    got = backbone64.encode_image(_images(), prompts)  # after_cls, the default
    torch.testing.assert_close(got, prenorm_image_features(backbone64.model.visual, _images(), prompts),
                               rtol=0, atol=1e-12)
    other = backbone64.encode_image(_images(), prompts, "after_cls_after_pre_norm")
    assert (got - other).abs().max() > 1e-6  # ln_pre of the tokens matters (far above float64 rounding)


def test_only_the_prompt_tokens_skip_the_pre_norm(backbone64):
    """The first block sees ln_pre's class and patch tokens in both placements; the prompt tokens
    raw after the pre-norm, normalised before it."""
    seen = []
    hook = backbone64.model.visual.transformer.resblocks[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].clone()))
    p = _prompts(1)
    try:
        for placement in ("after_cls", "after_cls_after_pre_norm"):
            backbone64.encode_image(_images(), p, placement)
    finally:
        hook.remove()
    before, after = (s if backbone64.model.visual.transformer.batch_first else s.transpose(0, 1) for s in seen)
    keep = [0, *range(3, before.shape[1])]
    torch.testing.assert_close(before[:, keep], after[:, keep], rtol=0, atol=0)
    torch.testing.assert_close(after[:, 1:3], p[0].expand(3, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(before[:, 1:3], backbone64.model.visual.ln_pre(p[0]).expand(3, -1, -1),
                               rtol=0, atol=1e-12)


def test_gradients_reach_the_tokens_only(tmp_path):
    bb = make_backbone(tmp_path, TINY_CLIP)
    vpt = VPTPromptLearner(bb, ["cat", "dog"], n_tokens=2, placement="after_cls_after_pre_norm")
    vpt(images=torch.randn(2, 3, 32, 32)).image_features.sum().backward()
    assert vpt.prompts.grad is not None and vpt.prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_timm_towers_take_the_placement():
    """A timm ViT with a pre-norm: the tokens skip it; without one the placement is after_cls."""
    torch.manual_seed(0)
    with_norm = TimmBackbone("vit_tiny_patch16_224", model_kwargs={**TIMM_TINY, "pre_norm": True})
    x, p = torch.randn(2, 3, 32, 32), [torch.randn(2, 32)]
    assert not torch.allclose(with_norm.encode_image(x, p, "after_cls"),
                              with_norm.encode_image(x, p, "after_cls_after_pre_norm"))
    torch.manual_seed(0)
    plain = TimmBackbone("vit_tiny_patch16_224", model_kwargs=TIMM_TINY)
    assert torch.equal(plain.encode_image(x, p, "after_cls"), plain.encode_image(x, p, "after_cls_after_pre_norm"))


def test_xavier_uniform_bound_is_mvlpts():
    # trainers/mvlpt.py: val = sqrt(6 / (3 * prod(patch) + vpt_dim)), vpt_dim the tower's width.
    assert xavier_uniform_bound((16, 16), 768) == math.sqrt(6.0 / (3 * 16 * 16 + 768)) == 0.0625
    assert xavier_uniform_bound((14, 14), 1024) == math.sqrt(6.0 / (3 * 196 + 1024))
    assert xavier_uniform_bound((8, 8), 32) == math.sqrt(6.0 / 224)


def test_xavier_tokens_are_mvlpts_draw(tmp_path):
    """Same seed, same numbers as MVLPT's two draws (input tokens, then the deep ones of the other
    layers), each ``nn.init.uniform_(-val, val)`` of a zero tensor."""
    bb = make_backbone(tmp_path, TINY_CLIP)
    val = math.sqrt(6.0 / (3 * 8 * 8 + 32))
    torch.manual_seed(5)
    shallow, deep = torch.zeros(1, 4, 32), torch.zeros(2, 4, 32)
    nn.init.uniform_(shallow, -val, val)
    nn.init.uniform_(deep, -val, val)
    torch.manual_seed(5)
    tokens = visual_prompt_tokens(3, 4, 32, backbone=bb, init="xavier_uniform")
    assert torch.equal(tokens.data, torch.cat([shallow, deep]))
    torch.manual_seed(5)
    vpt = VPTPromptLearner(bb, ["cat", "dog"], n_tokens=4, init="xavier_uniform")
    assert torch.equal(vpt.prompts.data, torch.cat([shallow, deep]))
    assert vpt.prompts.abs().max() <= val and vpt.prompts.abs().max() > 0.9 * val
    with pytest.raises(ValueError, match="normal or xavier_uniform"):
        visual_prompt_tokens(1, 4, 32, backbone=bb, init="kaiming")


def test_normal_init_is_unchanged(tmp_path):
    bb = make_backbone(tmp_path, TINY_CLIP)
    torch.manual_seed(3)
    want = torch.randn(3, 4, 32) * 0.02
    torch.manual_seed(3)
    assert torch.equal(VPTPromptLearner(bb, ["cat", "dog"], n_tokens=4).prompts.data, want)


def test_hugging_face_towers_take_the_placement(tmp_path):
    """CLIP/CLIPSeg through transformers: the tokens skip pre_layrnorm there too."""
    pytest.importorskip("monai")
    from test_hf_clipseg import tiny_clipseg
    from vlprompt.backbones import HFCLIPBackbone

    bb = HFCLIPBackbone(str(tiny_clipseg(tmp_path / "clipseg")), local_files_only=True)
    seen = []
    hook = bb._vision.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    p = [0.05 * torch.randn(2, 32)]
    try:
        for placement in ("after_cls", "after_cls_after_pre_norm"):
            bb.encode_image(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), p, placement)
    finally:
        hook.remove()
    before, after = seen
    torch.testing.assert_close(after[:, 1:3], p[0].expand(2, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(before[:, 1:3], bb.model.vision_model.pre_layrnorm(p[0]).expand(2, -1, -1))
    keep = [0, *range(3, before.shape[1])]
    torch.testing.assert_close(before[:, keep], after[:, keep], rtol=0, atol=0)
