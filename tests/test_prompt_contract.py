"""Generic contract every registered prompt learner satisfies (runs over the registry)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.methods.scoring import prompt_logits
from vlprompt.prompts import PROMPT_LEARNERS, load_prompt, save_prompt

CLASSES = ["cat", "dog", "golden retriever", "car"]
# Small, fast settings per learner; anything not listed uses its defaults.
# The tiny encoder has 3 text and 3 image layers.
TINY_KWARGS = {
    "coop": {"n_ctx": 4},
    "cocoop": {"n_ctx": 4, "ctx_init": None, "meta_reduction": 2},
    "vpt": {"n_tokens": 2, "depth": 2},
    "ivlp": {"n_ctx": 2, "ctx_init": None, "text_depth": 2, "n_vision_tokens": 3, "vision_depth": 3},
    "maple": {"depth": 3},
    "upt": {"n_ctx": 3, "depth": 2, "heads": 2},
    "promptsrc": {"text_depth": 3, "vision_depth": 2, "templates": "imagenet7"},
    "kgcoop": {"ctx_init": None, "n_ctx": 3},
    "decoupled_dept": {"learner_args": {"n_ctx": 4}},
    "shared_attention": {"heads": 2, "feedforward": 64, "dropout": 0.0},  # dropout: outputs compared in train mode
    "deep_cocoop": {"depth": 2, "hidden": 8},
}

LEARNERS = sorted(PROMPT_LEARNERS)


def build(name, backbone, classes=CLASSES, seed=0):
    torch.manual_seed(seed)
    return PROMPT_LEARNERS[name](backbone, classes, **TINY_KWARGS.get(name, {}))


def images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def logits_of(learner, imgs, out=None):
    """The logits every method trains and evaluates with (the methods' own scorer)."""
    return prompt_logits(out or learner(images=imgs), learner.backbone)


def training_loss(learner, imgs, labels):
    """The loss the methods train with: the weighted cross-entropy plus the learner's own loss."""
    out = learner(images=imgs)
    logits = logits_of(learner, imgs, out)
    loss = learner.classification_weight * F.cross_entropy(logits, labels)
    extra = learner.extra_loss(out, logits, labels)
    return loss if extra is None else loss + extra


def test_registry_lists_every_method():
    expected = {"zeroshot", "coop", "cocoop", "vpt", "ivlp", "maple", "upt", "promptsrc", "kgcoop"}
    assert expected <= set(PROMPT_LEARNERS)


@pytest.mark.parametrize("name", LEARNERS)
def test_extra_loss_is_finite_and_reaches_only_prompt_parameters(name, backbone):
    learner = build(name, backbone)
    learner.train()
    out = learner(images=images())
    logits = logits_of(learner, images(), out)
    extra = learner.extra_loss(out, logits, torch.tensor([0, 1, 2, 3, 0, 1]))
    if extra is None:
        pytest.skip(f"{name} adds no loss of its own")
    assert extra.dim() == 0 and torch.isfinite(extra)
    extra.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())


@pytest.mark.parametrize("name", LEARNERS)
def test_output_shapes(name, backbone):
    learner = build(name, backbone)
    out = learner(images=images())
    assert out.image_features.shape == (6, backbone.embed_dim)
    expected = (6, len(CLASSES), backbone.embed_dim) if learner.image_conditioned else (len(CLASSES), backbone.embed_dim)
    assert out.text_features.shape == expected
    assert logits_of(learner, images()).shape == (6, len(CLASSES))


@pytest.mark.parametrize("name", LEARNERS)
def test_gradients_reach_only_prompt_parameters(name, backbone):
    learner = build(name, backbone)
    if not list(learner.parameters()):
        pytest.skip(f"{name} has no learnable parameters")
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    training_loss(learner, images(), labels).backward()
    assert all(p.grad is not None for p in learner.parameters())
    if any(p.grad.abs().sum() == 0 for p in learner.parameters()):
        # Low-rank factors (DePT) start with one factor at zero, so the other gets no gradient
        # until the first step has moved it.
        torch.optim.SGD(learner.parameters(), lr=0.1).step()
        learner.zero_grad()
        training_loss(learner, images(), labels).backward()
    assert all(p.grad.abs().sum() > 0 for p in learner.parameters())
    assert all(p.grad is None for p in backbone.parameters())


@pytest.mark.parametrize("name", LEARNERS)
def test_state_dict_holds_only_learnable_tensors(name, backbone):
    learner = build(name, backbone)
    names = {n for n, _ in learner.named_parameters()}
    assert set(learner.state_dict()) == names
    assert not any(k.startswith("backbone") for k in learner.state_dict())


@pytest.mark.parametrize("name", LEARNERS)
def test_save_load_round_trip(name, backbone, tmp_path):
    learner = build(name, backbone)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.1 * torch.randn_like(p))  # not the initial values
    save_prompt(learner, tmp_path / "prompt")
    assert sorted(p.name for p in (tmp_path / "prompt").iterdir()) == ["config.json", "prompt.safetensors"]
    loaded = load_prompt(tmp_path / "prompt", backbone)
    assert type(loaded) is type(learner) and loaded.classnames == CLASSES
    assert torch.equal(logits_of(loaded, images()), logits_of(learner, images()))


@pytest.mark.parametrize("name", LEARNERS)
def test_set_classnames_evaluates_new_classes(name, backbone):
    learner = build(name, backbone)
    if getattr(learner, "class_specific_ctx", False):
        pytest.skip("class-specific contexts are tied to their classes")
    before = logits_of(learner, images())
    learner.set_classnames(["airplane", "ship", "truck"])
    assert learner.num_classes == 3
    assert logits_of(learner, images()).shape == (6, 3)
    learner.set_classnames(CLASSES)
    assert torch.allclose(logits_of(learner, images()), before, atol=1e-5)


@pytest.mark.parametrize("name", LEARNERS)
def test_seeded_construction_is_deterministic(name, backbone):
    a, b = build(name, backbone, seed=3), build(name, backbone, seed=3)
    assert torch.equal(logits_of(a, images()), logits_of(b, images()))


@pytest.mark.parametrize("name", LEARNERS)
def test_a_few_steps_lower_the_loss(name, backbone):
    learner = build(name, backbone)
    params = list(learner.parameters())
    if not params:
        pytest.skip(f"{name} has no learnable parameters")
    imgs, labels = images(8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    optimizer = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(25):
        loss = training_loss(learner, imgs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_empty_class_list_is_an_error(backbone):
    for name in LEARNERS:
        with pytest.raises(ValueError, match="class name"):
            PROMPT_LEARNERS[name](backbone, [], **TINY_KWARGS.get(name, {}))


@pytest.mark.parametrize("name", LEARNERS)
def test_hyperparameters_are_the_concrete_constructor_arguments(name, backbone):
    import inspect

    learner = build(name, backbone)
    signature = inspect.signature(type(learner).__init__)
    expected = {k: p.default for k, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    expected.update(TINY_KWARGS.get(name, {}))
    assert learner.hparams == expected
    # and exactly those rebuild the learner
    rebuilt = type(learner)(backbone, CLASSES, **learner.hparams)
    assert rebuilt.hparams == learner.hparams
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in learner.state_dict().items()}
