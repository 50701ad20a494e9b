"""Visual prompts in the backbones: exactness, depth semantics, placement, clear errors."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CLIP, make_backbone
from vlprompt.backbones import TimmBackbone

TIMM_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def _vision_cfg(**changes):
    return {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], **changes}}


TOWERS = {
    "class-token": TINY_CLIP,
    "average-pool": _vision_cfg(pool_type="avg"),
    "attention-pool": _vision_cfg(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
    "ln-after-pool": _vision_cfg(final_ln_after_pool=True, no_ln_pre=True),
}


def images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def timm_backbone():
    torch.manual_seed(0)
    return TimmBackbone("vit_tiny_patch16_224", model_kwargs={**TIMM_TINY, "reg_tokens": 2})


@pytest.mark.parametrize("tower", sorted(TOWERS))
@pytest.mark.parametrize("placement", ["after_cls", "after_patches"])
def test_empty_prompts_reproduce_the_plain_tower_exactly(tower, placement, tmp_path):
    backbone = make_backbone(tmp_path, TOWERS[tower])
    x = images()
    empty = [torch.zeros(0, backbone.vision_width)] * 2
    assert torch.equal(backbone.encode_image(x, empty, placement), backbone.encode_image(x))
    prompted = backbone.encode_image(x, [torch.randn(2, backbone.vision_width)], placement)
    assert prompted.shape == (3, backbone.embed_dim)
    assert not torch.allclose(prompted, backbone.encode_image(x))


def test_timm_towers_inside_open_clip_and_alone(tmp_path, timm_backbone):
    cfg = {**TINY_CLIP, "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                       "image_size": 160, "timm_pool": "", "timm_proj": "linear"}}
    wrapped = make_backbone(tmp_path, cfg)
    x = images(2, 160)
    assert torch.equal(wrapped.encode_image(x, [torch.zeros(0, wrapped.vision_width)]), wrapped.encode_image(x))
    assert wrapped.vision_layers == len(wrapped.model.visual.trunk.blocks)
    x = images(2)
    assert torch.equal(timm_backbone.encode_image(x, [torch.zeros(0, 32)]), timm_backbone.encode_image(x))
    assert timm_backbone.vision_layers == 3 and timm_backbone.embed_dim == 32


def test_a_timm_trunk_whose_own_head_is_the_projection(tmp_path):
    """MobileCLIP's layout: no open_clip projection, the timm trunk's classifier head (num_classes =
    embed_dim) is the projection; prompted features must go through it too."""
    cfg = {**TINY_CLIP, "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                       "image_size": 160, "timm_pool": "token", "timm_proj": None}}
    wrapped = make_backbone(tmp_path, cfg)
    assert wrapped.model.visual.trunk.num_classes == wrapped.embed_dim
    x = images(2, 160)
    assert torch.equal(wrapped.encode_image(x, [torch.zeros(0, wrapped.vision_width)]), wrapped.encode_image(x))
    assert wrapped.encode_image(x, [torch.randn(2, wrapped.vision_width)]).shape == (2, wrapped.embed_dim)


@pytest.mark.parametrize("pool", ["map", "avg", "token"])
def test_timm_pooling_modes(pool):
    torch.manual_seed(0)
    bb = TimmBackbone("vit_tiny_patch16_224", model_kwargs={**TIMM_TINY, "global_pool": pool})
    x = images(2)
    assert torch.equal(bb.encode_image(x, [torch.zeros(0, 32)], "after_patches"), bb.encode_image(x))
    assert not torch.allclose(bb.encode_image(x, [torch.randn(2, 32)]), bb.encode_image(x))


def _block_inputs(backbone, x, prompts, placement="after_cls"):
    """Inputs of every image block (prompts included) for one forward pass."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
             for b in backbone._vision.blocks]
    try:
        backbone.encode_image(x, prompts, placement)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("which", ["open_clip", "timm"])
def test_a_deep_prompt_at_layer_k_only_affects_layers_from_k(which, backbone, timm_backbone):
    bb = backbone if which == "open_clip" else timm_backbone
    x = images()
    prompts = [torch.randn(2, bb.vision_width) for _ in range(3)]
    base = _block_inputs(bb, x, prompts)
    for k in (1, 2):
        changed = list(prompts)
        # Not a constant shift: layer norms remove it, and later layers would differ by rounding only.
        changed[k] = prompts[k] + torch.randn_like(prompts[k])
        after = _block_inputs(bb, x, changed)
        for layer in range(3):
            same = torch.equal(after[layer], base[layer])
            assert same == (layer < k), f"prompt {k} changed the input of layer {layer}: {not same}"


def test_placement_puts_tokens_after_the_class_token_or_after_the_patches(backbone):
    x, p = images(), torch.randn(2, backbone.vision_width)
    first = _block_inputs(backbone, x, [p], "after_cls")[0]
    last = _block_inputs(backbone, x, [p], "after_patches")[0]
    assert first.shape == last.shape == (3, 1 + 16 + 2, backbone.vision_width)
    ln_pre = backbone.model.visual.ln_pre
    assert torch.allclose(first[:, 1:3], ln_pre(p).expand(3, -1, -1), atol=1e-6)
    assert torch.allclose(last[:, -2:], ln_pre(p).expand(3, -1, -1), atol=1e-6)


def test_per_image_prompts_match_shared_prompts(backbone):
    x, p = images(), torch.randn(2, backbone.vision_width)
    shared = backbone.encode_image(x, [p, p])
    per_image = backbone.encode_image(x, [p.expand(3, -1, -1), p.expand(3, -1, -1)])
    assert torch.allclose(shared, per_image, atol=1e-6)


def test_gradients_reach_the_prompts_and_not_the_encoder(backbone):
    p = torch.randn(2, backbone.vision_width, requires_grad=True)
    backbone.encode_image(images(), [p, p * 2]).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(q.grad is None for q in backbone.parameters())


def test_bad_visual_prompts_get_clear_errors(backbone, tmp_path):
    w = backbone.vision_width
    with pytest.raises(ValueError, match="image tower.s 3 layers, got 4"):
        backbone.encode_image(images(), [torch.zeros(1, w)] * 4)
    with pytest.raises(ValueError, match="tower's width is 32"):
        backbone.encode_image(images(), [torch.zeros(1, w + 1)])
    with pytest.raises(ValueError, match="placement"):
        backbone.encode_image(images(), [torch.zeros(1, w)], "before_everything")
    resnet = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
              "text_cfg": TINY_CLIP["text_cfg"]}
    rn = make_backbone(tmp_path, resnet)
    with pytest.raises(NotImplementedError, match="ModifiedResNet.*Supported: open_clip VisionTransformer"):
        rn.encode_image(torch.randn(1, 3, 32, 32), [torch.zeros(1, 16)])
    assert rn.encode_text(["a photo of a cat."]).shape == (1, 24)  # text-side methods still work


def test_visual_prompt_methods_refuse_a_resnet_but_text_methods_run(tmp_path):
    from vlprompt.prompts import PROMPT_LEARNERS

    resnet = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
              "text_cfg": TINY_CLIP["text_cfg"]}
    rn = make_backbone(tmp_path, resnet)
    for name, cls in PROMPT_LEARNERS.items():
        if cls.uses_image_tower:
            with pytest.raises(NotImplementedError, match="visual prompts need a ViT image tower"):
                cls(rn, ["cat", "dog"])
        else:
            out = cls(rn, ["cat", "dog"])(images=torch.randn(2, 3, 32, 32))
            assert out.image_features.shape == (2, 24)


def test_timm_backbone_has_no_text_tower(timm_backbone):
    from vlprompt.prompts import CoOpPromptLearner

    with pytest.raises(NotImplementedError, match="vision-only backbone.*VPT with head='linear'"):
        CoOpPromptLearner(timm_backbone, ["cat", "dog"])
    assert timm_backbone.text_tower is None and not timm_backbone.has_text
    for text_method in (lambda: timm_backbone.tokenize(["cat"]), lambda: timm_backbone.encode_text(["cat"])):
        with pytest.raises(NotImplementedError, match="vision-only backbone"):
            text_method()
    assert timm_backbone.preprocess_cfg["size"] == 32
    assert set(timm_backbone.identity) >= {"vision_width", "vision_layers", "fingerprint"}


def test_timm_backbone_loads_a_local_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TIMM_TINY)
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    loaded = TimmBackbone("vit_tiny_patch16_224", str(tmp_path / "vit.safetensors"), model_kwargs=TIMM_TINY)
    x = images(2)
    assert torch.allclose(loaded.encode_image(x), source.eval()(x), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        TimmBackbone("vit_tiny_patch16_224", str(tmp_path / "missing.pt"), model_kwargs=TIMM_TINY)


@pytest.mark.parametrize("name, kwargs", [("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2, "embed_dim": 48,
                                                                       "num_heads": 2}),
                                           ("vit_pe_core_tiny_patch16_384", {"img_size": 32, "depth": 2})])
def test_eva_towers_with_rotary_embeddings_take_prompts(name, kwargs):
    """timm Eva (EVA02, PE-Core): rotary embeddings keep applying to the patches only, with prompt
    tokens in the sequence; exact without prompts; placement makes no difference; checkpointing
    recomputes the same blocks."""
    torch.manual_seed(0)
    plain, checkpointed = (TimmBackbone(name, model_kwargs=kwargs, grad_checkpointing=g) for g in (False, True))
    checkpointed.load_state_dict(plain.state_dict())
    x = images(2, kwargs["img_size"])
    width = plain.vision_width
    assert torch.equal(plain.encode_image(x, [torch.zeros(0, width)]), plain.encode_image(x))
    prompts = [torch.randn(3, width, requires_grad=True) for _ in range(2)]
    after_cls = plain.encode_image(x, prompts, "after_cls")
    assert torch.allclose(after_cls, plain.encode_image(x, prompts, "after_patches"), atol=1e-6)
    assert not torch.allclose(after_cls, plain.encode_image(x), atol=1e-4)
    grads = torch.autograd.grad(after_cls.sum(), prompts)
    again = torch.autograd.grad(checkpointed.encode_image(x, prompts).sum(), prompts)
    assert all(g.abs().sum() > 0 and torch.allclose(g, h, atol=1e-5) for g, h in zip(grads, again))
