"""OpenCLIPBackbone: exact causal truncation, layouts, deep prompts, freezing, identity."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_CLIP, make_backbone
from vlprompt.backbones import BackboneMismatchError, OpenCLIPBackbone, check_backbone_identity

TEXTS = ["a photo of a cat.", "dog", "a rather long sentence about many different things in a scene"]


def _custom_text_cfg(**text_overrides):
    cfg = copy.deepcopy(TINY_CLIP)
    cfg["custom_text"] = True
    cfg["text_cfg"].update(text_overrides)
    return cfg


@pytest.mark.parametrize("layout", ["clip", "custom_text"])
def test_truncated_text_equals_full_context(tmp_path, layout):
    cfg = TINY_CLIP if layout == "clip" else _custom_text_cfg()
    backbone = make_backbone(tmp_path / layout, cfg)
    assert backbone.is_causal and backbone.can_truncate_text
    ids = backbone.tokenize(TEXTS)
    assert backbone.text_length_needed(ids) < ids.shape[1]  # truncation really happens
    reference = backbone.model.encode_text(ids)  # open_clip's own full-context path
    ours = backbone.encode_text(ids)
    assert (ours - reference).abs().max().item() <= 1e-5
    backbone.truncate_text = False
    assert (backbone.encode_text(ids) - reference).abs().max().item() <= 1e-5


def test_non_causal_tower_is_never_truncated(tmp_path):
    backbone = make_backbone(tmp_path, _custom_text_cfg(no_causal_mask=True))
    assert not backbone.is_causal and not backbone.can_truncate_text
    ids = backbone.tokenize(TEXTS)
    assert backbone.text_length_needed(ids) == ids.shape[1]
    reference = backbone.model.encode_text(ids)
    assert torch.allclose(backbone.encode_text(ids), reference, atol=1e-5)
    # Truncating a bidirectional tower would change the features: the guard matters.
    short = backbone.pool_indices(ids).max().item() + 1
    truncated = backbone.encode_text_embeddings(backbone.token_embedding(ids[:, :short]), ids[:, :short])
    assert not torch.allclose(truncated, reference, atol=1e-4)


def test_widths_and_pooling_read_from_model(backbone):
    assert (backbone.text_width, backbone.vision_width, backbone.embed_dim) == (48, 32, 24)
    assert backbone.context_length == 32 and backbone.text_layers == 3
    assert backbone.pool_type == "argmax" and backbone.text_start == 1
    assert backbone.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 24)
    assert backbone.preprocess_cfg["size"] in (32, (32, 32))


def test_backbone_is_frozen_and_stays_in_eval_mode(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())


def _layer_outputs(backbone, deep_prompts):
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone())) for b in backbone.text_tower.blocks]
    ids = backbone.tokenize(["a photo of a dog."])
    backbone.encode_text_embeddings(backbone.token_embedding(ids), ids, deep_prompts=deep_prompts)
    for h in hooks:
        h.remove()
    return outputs


def test_deep_prompt_at_layer_k_only_affects_layers_from_k(backbone):
    torch.manual_seed(0)
    base = [torch.zeros(2, backbone.text_width), torch.zeros(2, backbone.text_width)]
    changed = [base[0], torch.randn(2, backbone.text_width)]  # only layer 2's prompt differs
    a, b = _layer_outputs(backbone, base), _layer_outputs(backbone, changed)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # layers 0 and 1 untouched
    assert not torch.allclose(a[2], b[2])  # layer 2 sees the new prompt


def test_too_many_deep_prompts_is_an_error(backbone):
    ids = backbone.tokenize(["x"])
    prompts = [torch.zeros(1, backbone.text_width)] * backbone.text_layers
    with pytest.raises(ValueError, match="deep prompt"):
        backbone.encode_text_embeddings(backbone.token_embedding(ids), ids, deep_prompts=prompts)


def test_identity_tells_weights_and_shapes_apart(tmp_path):
    a = make_backbone(tmp_path / "a", seed=0)
    b = make_backbone(tmp_path / "b", seed=1)
    check_backbone_identity(a.identity, a.identity)
    with pytest.raises(BackboneMismatchError, match="different weights"):
        check_backbone_identity(a.identity, b.identity)
    wider = copy.deepcopy(TINY_CLIP)
    wider["text_cfg"]["width"] = 64
    c = make_backbone(tmp_path / "c", wider)
    with pytest.raises(BackboneMismatchError, match="text_width"):
        check_backbone_identity(a.identity, c.identity)


def test_unknown_pretrained_tag_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a file nor a known open_clip tag"):
        OpenCLIPBackbone("ViT-B-32", pretrained="no-such-tag")


def test_unknown_zoo_model_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="No embedded model"):
        OpenCLIPBackbone("zoo:does-not-exist")


def test_pretrained_local_checkpoint_file(tmp_path, backbone):
    """A built-in-style model name plus a local weights file, as users pass real checkpoints."""
    import json

    import open_clip
    from safetensors.torch import save_file

    (tmp_path / "vlprompt-test-tiny.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "vlprompt-test-tiny.json")
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(weights))
    loaded = OpenCLIPBackbone("vlprompt-test-tiny", pretrained=str(weights))
    assert loaded.identity["fingerprint"] == backbone.identity["fingerprint"]
    ids = backbone.tokenize(TEXTS)
    assert torch.equal(loaded.encode_text(ids), backbone.encode_text(ids))


def test_wrap_an_open_clip_model_in_memory(tiny_model_dir):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    b = OpenCLIPBackbone.from_model(model, name="my-finetuned-clip")
    assert b.identity["name"] == "my-finetuned-clip" and not any(p.requires_grad for p in model.parameters())
    texts = ["a photo of a cat.", "dog"]
    ids = open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}")(texts)
    with torch.no_grad():
        assert torch.allclose(b.encode_text(texts), model.encode_text(ids), atol=1e-5)
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(b.encode_image(x, [torch.zeros(0, b.vision_width)]), model.encode_image(x))


TINY_COCA = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "attentional_pool": True,
                   "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 20, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


def test_coca_text_prompts_reproduce_its_own_text_features(tmp_path):
    """CoCa: a class token appended after the text, pooled last, and the legacy padding-mask order
    of the released weights; CoOp's hand-written start reproduces encode_text exactly."""
    from vlprompt.prompts import CoOpPromptLearner, MaPLePromptLearner

    b = make_backbone(tmp_path, TINY_COCA)
    assert type(b.model).__name__ == "CoCa" and b.pool_type == "last" and b.text_start == 1
    texts = ["a photo of a cat.", "dog", "a rather long sentence about things"]
    with torch.no_grad():
        own = b.model.encode_text(b.tokenize(texts), normalize=False)
        assert torch.allclose(b.encode_text(texts), own, atol=1e-5)
        coop = CoOpPromptLearner(b, ["cat", "hot dog"], ctx_init="a photo of a")
        own = b.model.encode_text(b.tokenize(["a photo of a cat.", "a photo of a hot dog."]), normalize=False)
        assert torch.allclose(coop.text_features(), own, atol=1e-5)
    maple = MaPLePromptLearner(b, ["cat", "dog"], depth=2)
    maple(images=torch.randn(2, 3, 32, 32)).text_features.sum().backward()
    assert maple.ctx.grad is not None and maple.ctx.grad.abs().sum() > 0
