"""Shared-prefix text encoding (``share_prefix``): every learner gets the same text features and
gradients as on the plain path, the hand-written prompt gives open_clip's own ``encode_text`` for
every class-token position, and bidirectional towers never take the shortcut. In float64, so
that "the same" means to 1e-10: only the order of floating-point sums differs."""

from __future__ import annotations

import pytest
import torch

import vlprompt.backbones.base as backbone_base
from conftest import TINY_CLIP, make_backbone
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.prompts import PROMPT_LEARNERS

NAMES = ["cat", "red square", "a rather long class name of many words", "dog", "sea lion", "x"]

#: (learner, options, whether the prompts share a prefix of >= 2 tokens)
CASES = [
    ("coop", {}, True),
    ("coop", {"class_token_position": "middle"}, True),
    ("coop", {"class_token_position": "front"}, False),  # only the start token is shared
    ("coop", {"n_ctx": 2, "ctx_init": "a photo of a"}, True),  # fixed words after the context
    ("coop", {"class_specific_ctx": True}, False),
    ("dept", {}, True),
    ("kgcoop", {}, True),
    ("cocoop", {}, True),  # one prefix per image
    ("ivlp", {}, True),
    ("maple", {}, True),
    ("promptsrc", {}, True),
    ("upt", {}, True),
]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    fast = make_backbone(tmp_path_factory.mktemp("prefix"), seed=0).double()
    plain = OpenCLIPBackbone.from_model(fast.model, fast.tokenizer, share_prefix=False)
    return fast, plain


@pytest.fixture()
def prefix_calls(monkeypatch):
    calls = []
    real = backbone_base.encode_prefix
    monkeypatch.setattr(backbone_base, "encode_prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def features_and_grads(learner, backbone, images):
    learner.backbone = backbone
    learner.zero_grad()
    text = learner(images=images).text_features
    (text.pow(2).sum(-1).sqrt() * torch.arange(1, text.shape[-2] + 1)).sum().backward()
    return text.detach(), {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


def assert_same_as_plain(ours, our_grads, theirs, their_grads):
    """The features and every gradient of the plain path, to float64's 1e-10."""
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-8)
    for name in their_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=1e-10, rtol=1e-8,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("method", "options", "shared"), CASES, ids=[f"{m}-{o}" for m, o, _ in CASES])
def test_same_features_and_gradients_as_the_plain_path(method, options, shared, backbones, prefix_calls):
    fast, plain = backbones
    torch.manual_seed(0)
    learner = PROMPT_LEARNERS[method](fast, NAMES, **options).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ours, our_grads = features_and_grads(learner, fast, images)
    assert bool(prefix_calls) == shared
    theirs, their_grads = features_and_grads(learner, plain, images)
    assert our_grads.keys() == their_grads.keys() and our_grads
    assert_same_as_plain(ours, our_grads, theirs, their_grads)


@pytest.mark.parametrize(("position", "template"), [("end", "a photo of a {}."), ("middle", "a photo {} of a."),
                                                    ("front", "{} a photo of a.")])
def test_the_hand_written_prompt_gives_open_clips_encode_text(position, template, backbones):
    fast, _ = backbones
    learner = PROMPT_LEARNERS["coop"](fast, NAMES, ctx_init="a photo of a", class_token_position=position).double()
    with torch.no_grad():
        ours = learner().text_features
        theirs = fast.model.encode_text(fast.tokenize([template.format(n) for n in NAMES]))
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunks_and_checkpointing_on_the_prefix_path(checkpointing, backbones, tmp_path, prefix_calls):
    fast, plain = backbones
    chunked = OpenCLIPBackbone.from_model(fast.model, fast.tokenizer, text_chunk_size=2,
                                          grad_checkpointing=checkpointing)
    torch.manual_seed(0)
    learner = PROMPT_LEARNERS["maple"](fast, NAMES * 3).double()
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    ours, our_grads = features_and_grads(learner, chunked, images)
    assert prefix_calls
    theirs, their_grads = features_and_grads(learner, plain, images)
    assert_same_as_plain(ours, our_grads, theirs, their_grads)


def test_bidirectional_towers_never_take_the_shortcut(tmp_path, prefix_calls):
    cfg = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "no_causal_mask": True, "pool_type": "last"}}
    backbone = make_backbone(tmp_path, cfg)
    assert not backbone.can_truncate_text
    learner = PROMPT_LEARNERS["coop"](backbone, NAMES, ctx_init="a photo of a")
    with torch.no_grad():
        ours = learner().text_features
        theirs = backbone.model.encode_text(backbone.tokenize([f"a photo of a {n}." for n in NAMES]))
    assert not prefix_calls
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_groups_must_divide_the_prompts(backbones):
    fast, _ = backbones
    ids = fast.tokenize(NAMES[:3])
    with pytest.raises(ValueError, match="groups of equal size"):
        fast.encode_text_embeddings(fast.token_embedding(ids), ids, shared_prefix=2, prefix_groups=2)
