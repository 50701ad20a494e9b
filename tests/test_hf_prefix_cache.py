"""Hugging Face CLIP through the shared text path: shared-prefix encoding and chunking give every
learner the same text features and gradients as the plain path, and the hand-written prompt gives
transformers' own ``get_text_features``. In float64, so that "the same" means to 1e-10: only the
order of floating-point sums differs (as in test_prefix_cache.py for open_clip)."""

from __future__ import annotations

import pytest
import torch

from test_prefix_cache import NAMES, assert_same_as_plain, features_and_grads, prefix_calls  # noqa: F401 (a fixture)
from vlprompt.backbones import HFCLIPBackbone
from vlprompt.prompts import PROMPT_LEARNERS

transformers = pytest.importorskip("transformers")

#: (learner, options, whether the prompts share a prefix of >= 2 tokens); sized for the tiny model
CASES = [
    ("coop", {"n_ctx": 4}, True),
    ("coop", {"n_ctx": 4, "class_token_position": "middle"}, True),
    ("coop", {"n_ctx": 4, "class_token_position": "front"}, False),  # only the start token is shared
    ("coop", {"n_ctx": 2, "ctx_init": "a photo of a"}, True),  # fixed words after the context
    ("coop", {"n_ctx": 4, "class_specific_ctx": True}, False),
    ("dept", {"n_ctx": 4}, True),
    ("kgcoop", {"n_ctx": 3, "ctx_init": None}, True),
    ("cocoop", {"n_ctx": 4, "ctx_init": None, "meta_reduction": 2}, True),  # one prefix per image
    ("ivlp", {"n_ctx": 2, "ctx_init": None, "text_depth": 2, "n_vision_tokens": 3, "vision_depth": 3}, True),
    ("maple", {"depth": 3}, True),
    ("promptsrc", {"text_depth": 3, "vision_depth": 2, "templates": "imagenet7"}, True),
    ("upt", {"n_ctx": 3, "depth": 2, "heads": 2}, True),
]


#: A tiny configuration with CLIP's vocabulary, 3 text layers, 32 px images (for CLIP and CLIPSeg).
TINY = {"text_config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                        "num_attention_heads": 2, "max_position_embeddings": 32},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                          "image_size": 32, "patch_size": 8},
        "projection_dim": 16}


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    """A tiny random transformers ``CLIPModel`` (:data:`TINY`)."""
    torch.manual_seed(seed)
    return transformers.CLIPModel(transformers.CLIPConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def backbones():
    model = tiny_clip().double()
    fast = HFCLIPBackbone.from_model(model)
    plain = HFCLIPBackbone.from_model(model, share_prefix=False)
    return fast, plain


def test_the_blocks_take_the_prefix_cache(backbones):
    fast, _ = backbones
    assert fast.text_tower.prefix_cache and fast.can_truncate_text and fast.share_prefix


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
def test_the_hand_written_prompt_gives_transformers_own_text_features(position, template, backbones):
    fast, _ = backbones
    learner = PROMPT_LEARNERS["coop"](fast, NAMES, ctx_init="a photo of a", class_token_position=position).double()
    with torch.no_grad():
        ours = learner().text_features
        theirs = fast.model.get_text_features(input_ids=fast.tokenize([template.format(n) for n in NAMES]))
    theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_chunks_and_checkpointing(share_prefix, checkpointing, backbones, prefix_calls):
    fast, plain = backbones
    chunked = HFCLIPBackbone.from_model(fast.model, fast.tokenizer, text_chunk_size=2, share_prefix=share_prefix,
                                        grad_checkpointing=checkpointing)
    torch.manual_seed(0)
    learner = PROMPT_LEARNERS["maple"](fast, NAMES * 3, depth=3).double()
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    ours, our_grads = features_and_grads(learner, chunked, images)
    assert bool(prefix_calls) == share_prefix
    theirs, their_grads = features_and_grads(learner, plain, images)
    assert_same_as_plain(ours, our_grads, theirs, their_grads)


def test_chunk_size_is_checked():
    with pytest.raises(ValueError, match="text_chunk_size"):
        HFCLIPBackbone.from_model(tiny_clip(), text_chunk_size=0)


@pytest.mark.parametrize("method", ["coop", "maple"])
def test_clipseg_text_tower_takes_the_prefix_path_exactly(method, prefix_calls):
    torch.manual_seed(0)
    model = transformers.CLIPSegModel(transformers.CLIPSegConfig(**TINY)).eval().double()
    fast, plain = HFCLIPBackbone.from_model(model), HFCLIPBackbone.from_model(model, share_prefix=False)
    assert fast.text_tower.prefix_cache
    options = {"coop": {"n_ctx": 4}, "maple": {"depth": 3}}[method]
    learner = PROMPT_LEARNERS[method](fast, NAMES, **options).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ours, our_grads = features_and_grads(learner, fast, images)
    assert prefix_calls
    theirs, their_grads = features_and_grads(learner, plain, images)
    assert_same_as_plain(ours, our_grads, theirs, their_grads)
