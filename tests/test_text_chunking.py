"""Chunked text encoding (``text_chunk_size``): same features and gradients as encoding all prompts
at once, with and without gradient checkpointing, each chunk truncated to its own length. Compared
in float64, so that "the same" means to 1e-10: only the order of floating-point sums differs."""

from __future__ import annotations

import copy

import pytest
import torch

import vlprompt.backbones.base as backbone_base
import vlprompt.backbones.vision as vision
from conftest import make_backbone

# Two placeholder words stand where deep prompts go (prompt_start=1, 2 tokens), as in a real prompt.
# Short and long names are mixed so that chunks need different lengths.
TEXTS = [
    "x x dog.",
    "x x a photo of a cat.",
    "x x car.",
    "x x a rather long sentence about many different things in one scene.",
    "x x tree.",
    "x x a small red house by the sea.",
    "x x bird.",
]
N_PROMPT_TOKENS = 2


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """The same tiny random encoder twice: plain and with gradient checkpointing."""
    root = tmp_path_factory.mktemp("chunking")
    return {
        False: make_backbone(root / "plain", seed=0),
        True: make_backbone(root / "checkpointed", seed=0, grad_checkpointing=True),
    }


@pytest.fixture(scope="module")
def double_backbones(backbones):
    """The same in float64: other batch shapes sum in another order, which in float32 moves
    features of size ~4 by ~1e-6 and gradients of size ~20 by ~1e-5, depending on the CPU."""
    return {flag: copy.deepcopy(backbone).double() for flag, backbone in backbones.items()}


def _inputs(backbone, deep: str, requires_grad: bool = False):
    ids = backbone.tokenize(TEXTS)
    g = torch.Generator().manual_seed(0)
    embeddings = backbone.token_embedding(ids)
    embeddings = embeddings + 0.1 * torch.randn(embeddings.shape, generator=g, dtype=embeddings.dtype)
    shapes = {
        "none": [],
        "shared": [(N_PROMPT_TOKENS, backbone.text_width)] * 2,
        "per_prompt": [(len(TEXTS), N_PROMPT_TOKENS, backbone.text_width)] * 2,
        "mixed": [(N_PROMPT_TOKENS, backbone.text_width), (len(TEXTS), N_PROMPT_TOKENS, backbone.text_width)],
    }[deep]
    deep_prompts = [torch.randn(shape, generator=g, dtype=embeddings.dtype) for shape in shapes]
    for t in [embeddings, *deep_prompts]:
        t.requires_grad_(requires_grad)
    return embeddings, ids, deep_prompts


def _encode(backbone, chunk: int | None, embeddings, ids, deep_prompts):
    backbone.text_chunk_size = chunk
    try:
        return backbone.encode_text_embeddings(embeddings, ids, deep_prompts=deep_prompts or None)
    finally:
        backbone.text_chunk_size = None


def _count_checkpoints(monkeypatch, module) -> list[int]:
    """Calls of ``torch.utils.checkpoint.checkpoint`` as imported by ``module``, recorded in the list."""
    calls: list[int] = []
    original = module.checkpoint
    monkeypatch.setattr(module, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


DEEP = ["none", "shared", "per_prompt", "mixed"]
# 1 and 3 do not divide the 7 prompts; 7 is exactly one chunk; 16 is more than all of them.
CHUNKS = [1, 3, 7, 16]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("deep", DEEP)
def test_chunked_features_equal_unchunked(double_backbones, deep, chunk):
    backbone = double_backbones[False]
    embeddings, ids, deep_prompts = _inputs(backbone, deep)
    with torch.no_grad():
        reference = _encode(backbone, None, embeddings, ids, deep_prompts)
        chunked = _encode(backbone, chunk, embeddings, ids, deep_prompts)
    assert chunked.shape == (len(TEXTS), backbone.embed_dim) and chunked.dtype == torch.float64
    torch.testing.assert_close(chunked, reference, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
@pytest.mark.parametrize("chunk", [3, 16])
@pytest.mark.parametrize("deep", DEEP)
def test_chunked_gradients_equal_unchunked(double_backbones, deep, chunk, checkpointing, monkeypatch):
    backbones = double_backbones
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(len(TEXTS), backbones[False].embed_dim, generator=g, dtype=torch.float64)

    def features_and_grads(backbone, chunk):
        embeddings, ids, deep_prompts = _inputs(backbone, deep, requires_grad=True)
        features = _encode(backbone, chunk, embeddings, ids, deep_prompts)
        (features * weights).sum().backward()
        assert all(p.grad is None for p in backbone.parameters())
        return features.detach(), [t.grad for t in [embeddings, *deep_prompts]]

    reference, reference_grads = features_and_grads(backbones[False], None)
    chunk_calls, block_calls = _count_checkpoints(monkeypatch, backbone_base), _count_checkpoints(monkeypatch, vision)
    features, grads = features_and_grads(backbones[checkpointing], chunk)

    chunked = chunk < len(TEXTS)
    # Chunks are checkpointed whole (their blocks then run plainly); unchunked, each block is.
    assert len(chunk_calls) == (3 if checkpointing and chunked else 0)
    assert len(block_calls) == (backbones[False].text_layers if checkpointing and not chunked else 0)
    torch.testing.assert_close(features, reference, atol=1e-10, rtol=1e-8)
    assert len(grads) == len(reference_grads)
    for grad, expected in zip(grads, reference_grads):
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-8)


def test_each_chunk_is_truncated_to_its_own_length(backbones, monkeypatch):
    backbone = backbones[False]
    embeddings, ids, _ = _inputs(backbone, "none")
    lengths = []
    original = backbone.text_tower.encode
    monkeypatch.setattr(backbone.text_tower, "encode", lambda x, *a: lengths.append(x.shape[1]) or original(x, *a))
    with torch.no_grad():
        _encode(backbone, 3, embeddings, ids, [])
    needed = [backbone.text_length_needed(ids[i : i + 3]) for i in range(0, len(TEXTS), 3)]
    assert lengths == needed
    assert len(set(needed)) > 1 and max(needed) == backbone.text_length_needed(ids)


def test_no_recomputation_without_autograd(backbones, monkeypatch):
    calls = _count_checkpoints(monkeypatch, backbone_base)
    backbone = backbones[True]
    with torch.no_grad():
        _encode(backbone, 3, *_inputs(backbone, "mixed", requires_grad=True))
    _encode(backbone, 3, *_inputs(backbone, "mixed", requires_grad=False))  # nothing asks for gradients
    assert not calls


def test_chunk_size_is_a_setting_not_identity(tmp_path):
    chunked = make_backbone(tmp_path / "a", seed=0, text_chunk_size=4)
    plain = make_backbone(tmp_path / "b", seed=0)
    assert chunked.text_chunk_size == 4 and plain.text_chunk_size is None
    same = lambda identity: {k: v for k, v in identity.items() if k != "name"}  # noqa: E731 (two folders)
    assert same(chunked.identity) == same(plain.identity)
    with pytest.raises(ValueError, match="text_chunk_size"):
        make_backbone(tmp_path / "c", text_chunk_size=0)
