"""What makes CoOp and CoCoOp themselves: initialisation, layouts, Dassl import."""

from __future__ import annotations

import pytest
import torch

from vlprompt.prompts import CoCoOpPromptLearner, CoOpPromptLearner, ZeroShotPrompt

NAMES = ["cat", "golden retriever", "x-ray machine"]


@pytest.mark.parametrize(
    ("position", "template"),
    [("end", "a photo of a {}."), ("front", "{} a photo of a."), ("middle", "a photo {} of a.")],
)
def test_init_from_words_reproduces_the_hand_written_prompt(backbone, position, template):
    coop = CoOpPromptLearner(backbone, NAMES, ctx_init="a photo of a", class_token_position=position)
    assert coop.n_ctx == 4
    reference = backbone.encode_text([template.format(n) for n in NAMES])
    # Features of size ~4 through the shared-prefix path: float32 sums in another order (~1e-6);
    # test_prefix_cache proves the same equality to 1e-10 in float64.
    assert torch.allclose(coop.text_features(), reference, atol=1e-5)


def test_zero_shot_equals_plain_clip_and_ensembles_normalise(backbone):
    single = ZeroShotPrompt(backbone, NAMES, templates="a photo of a {}.")
    assert torch.allclose(single.text_features(), backbone.encode_text([f"a photo of a {n}." for n in NAMES]))
    ensemble = ZeroShotPrompt(backbone, NAMES, templates=["a photo of a {}.", "a drawing of a {}."])
    assert torch.allclose(ensemble.text_features().norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="exactly one"):
        ZeroShotPrompt(backbone, NAMES, templates="no placeholder")


def test_random_init_and_class_specific_contexts(backbone):
    unified = CoOpPromptLearner(backbone, NAMES, n_ctx=8)
    assert unified.ctx.shape == (8, backbone.text_width)
    csc = CoOpPromptLearner(backbone, NAMES, n_ctx=8, class_specific_ctx=True)
    assert csc.ctx.shape == (3, 8, backbone.text_width)
    # Each class's feature depends on its own context only.
    before = csc.text_features().detach()
    with torch.no_grad():  # not a constant shift: layer norms remove it, leaving rounding only
        csc.ctx[1].add_(torch.randn_like(csc.ctx[1]))
    after = csc.text_features().detach()
    # (allclose: a batched matmul may round a row differently when other rows change, ~1e-6 on features of size ~3)
    assert torch.allclose(before[0], after[0], atol=1e-5) and torch.allclose(before[2], after[2], atol=1e-5)
    assert not torch.allclose(before[1], after[1])
    with pytest.raises(ValueError, match="class-specific"):
        csc.set_classnames(["a", "b"])


def test_prompt_longer_than_context_is_a_clear_error(backbone):
    with pytest.raises(ValueError, match="does not fit"):
        CoOpPromptLearner(backbone, ["a very long class name " * 4], n_ctx=16)


def test_dassl_coop_checkpoint_import(backbone, tmp_path):
    ctx = torch.randn(4, backbone.text_width)
    checkpoint = {
        "state_dict": {"ctx": ctx, "token_prefix": torch.zeros(3, 1, 48), "token_suffix": torch.zeros(3, 27, 48)},
        "epoch": 50,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.002, "momentum": 0.9, "params": [0]}]},
    }
    path = tmp_path / "model.pth.tar-50"
    torch.save(checkpoint, path)
    coop = CoOpPromptLearner(backbone, NAMES, n_ctx=4)
    coop.load_dassl_checkpoint(path)
    assert torch.equal(coop.ctx.detach(), ctx)
    wrong = CoOpPromptLearner(backbone, NAMES, n_ctx=8)
    with pytest.raises(ValueError, match="context shape"):
        wrong.load_dassl_checkpoint(path)


def test_dassl_cocoop_checkpoint_import(backbone, tmp_path):
    source = CoCoOpPromptLearner(backbone, NAMES, meta_reduction=4)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = {f"prompt_learner.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 10}, tmp_path / "ckpt")
    target = CoCoOpPromptLearner(backbone, NAMES, meta_reduction=4)
    target.load_dassl_checkpoint(tmp_path / "ckpt")
    features = backbone.encode_image(torch.randn(2, 3, 32, 32))
    assert torch.equal(target.text_features(features), source.text_features(features))


class NotATensor:
    """Stands for an arbitrary pickled object in a checkpoint."""


def test_pickled_objects_are_refused(tmp_path, backbone):
    torch.save({"state_dict": {"ctx": torch.zeros(4, 48)}, "extra": NotATensor()}, tmp_path / "evil")
    with pytest.raises(ValueError, match="not a readable"):
        CoOpPromptLearner(backbone, NAMES, n_ctx=4).load_dassl_checkpoint(tmp_path / "evil")


def test_cocoop_classifier_depends_on_the_image(backbone):
    cocoop = CoCoOpPromptLearner(backbone, NAMES, meta_reduction=4)
    with torch.no_grad():
        cocoop.meta_net.linear2.weight.normal_()
    feats = backbone.encode_image(torch.randn(2, 3, 32, 32))
    text = cocoop.text_features(feats)
    assert text.shape == (2, 3, backbone.embed_dim)
    assert not torch.allclose(text[0], text[1])
    # The meta-net has the paper's shape: embed_dim -> embed_dim // 16 -> text width.
    paper = CoCoOpPromptLearner(backbone, NAMES)
    assert paper.meta_net.linear1.out_features == max(1, backbone.embed_dim // 16)
    assert paper.meta_net.linear2.out_features == backbone.text_width
