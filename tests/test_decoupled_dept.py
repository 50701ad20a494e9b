"""Decoupled DePT (Zhang et al., CVPR 2024): the loss and the logits are the reference code's
(written out here from its formulas), the head scores only classes it learned, saved prompts and
checkpoints keep the head's classes, and the head learns at its own rate."""

from __future__ import annotations

import copy
import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from vlprompt.data import FewShotDataModule
from vlprompt.methods import PromptClassifier
from vlprompt.methods.scoring import prompt_logits
from vlprompt.prompts import DecoupledDePTPromptLearner, load_prompt, save_prompt

BASE = ["cat", "dog", "golden retriever", "car"]


def _learner(backbone, learner="coop", classes=BASE, **kw):
    """A learner in the backbone's precision, its tensors moved off their initial values."""
    torch.manual_seed(0)
    args = {"coop": {"n_ctx": 4}, "cocoop": {"n_ctx": 4, "ctx_init": None, "meta_reduction": 2},
            "kgcoop": {"n_ctx": 3, "ctx_init": None}}[learner]
    model = DecoupledDePTPromptLearner(backbone, classes, learner=learner, learner_args=args, **kw)
    model.to(backbone.logit_scale.dtype)
    with torch.no_grad():  # away from the initial values (scales 1, shifts 0)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture()
def backbone64(backbone):
    return copy.deepcopy(backbone).double()


def _images(n=6):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _reference(model, images, labels, weight=0.7):
    """The reference code's forward (trainers/elp_coop.py and elp_cocoop.py), in plain torch."""
    image_feats = model.backbone.encode_image(images)
    text_feats = model.inner.text_features(image_feats)
    img_n = image_feats / image_feats.norm(dim=-1, keepdim=True)
    txt_n = text_feats / text_feats.norm(dim=-1, keepdim=True)
    scale = model.backbone.logit_scale
    logits = scale * (img_n @ txt_n.t() if txt_n.dim() == 2 else torch.einsum("bd,bcd->bc", img_n, txt_n))
    film_img = model.image_scale * image_feats + model.image_shift
    film_txt = model.text_scale * text_feats + model.text_shift
    own = film_txt[labels] if film_txt.dim() == 2 else film_txt[torch.arange(len(labels)), labels]
    logits_lp = model.head(torch.cat([own, film_img]))
    loss = (1 - weight) * F.cross_entropy(logits, labels) + weight * F.cross_entropy(logits_lp, torch.cat([labels, labels]))
    fused = (1 - weight) * logits + weight * model.head(film_img)
    return loss, fused, logits


def _training_loss(model, images, labels):
    """What PromptClassifier.training_step computes."""
    out = model(images=images)
    logits = prompt_logits(out, model.backbone)
    extra = model.extra_loss(out, logits, labels)
    return model.classification_weight * F.cross_entropy(logits, labels) + extra


@pytest.mark.parametrize("learner", ["coop", "cocoop", "kgcoop"])
def test_loss_and_logits_are_the_references(learner, backbone64):
    backbone = backbone64
    model = _learner(backbone, learner)
    images, labels = _images(), torch.tensor([0, 1, 2, 3, 0, 2])
    with torch.no_grad():
        ref_loss, ref_fused, ref_clip = _reference(model, images, labels)
        if learner == "kgcoop":  # the reference adds KgCoOp's own loss unweighted by the head's share
            out = model(images=images)
            ref_loss = ref_loss + model.inner.extra_loss(out, prompt_logits(out, backbone), labels)
        torch.testing.assert_close(_training_loss(model, images, labels), ref_loss, rtol=0, atol=1e-10)
        model.eval()
        torch.testing.assert_close(prompt_logits(model(images=images), backbone), ref_fused, rtol=0, atol=1e-10)
        # Without fusion, the head's logits alone.
        model.fuse = False
        head_only = model.head(model.image_scale * backbone.encode_image(images) + model.image_shift)
        torch.testing.assert_close(prompt_logits(model(images=images), backbone), head_only, rtol=0, atol=1e-10)


def test_the_head_scores_only_classes_it_learned(backbone64):
    backbone = backbone64
    model = _learner(backbone).eval()
    images = _images()
    with torch.no_grad():
        _, fused, _ = _reference(model, images, torch.zeros(6, dtype=torch.long))
        # A subset of the base classes, in another order: the head's rows for them.
        model.set_classnames(["car", "cat"])
        torch.testing.assert_close(prompt_logits(model(images=images), backbone), fused[:, [3, 0]], rtol=0, atol=1e-10)
        # Novel classes: CLIP's logits of the prompt inside, alone.
        model.set_classnames(["airplane", "cat"])
        out = model(images=images)
        assert out.head_logits is None
        torch.testing.assert_close(prompt_logits(out, backbone), prompt_logits(model.inner(images=images), backbone))
        # Training on classes the head was not built for is refused.
        model.train()
        with pytest.raises(ValueError, match="head on the classes it was built for"):
            _training_loss(model, images, torch.zeros(6, dtype=torch.long))


def test_a_saved_prompt_keeps_the_head_classes(backbone, tmp_path):
    model = _learner(backbone).eval()
    images = _images().float()
    with torch.no_grad():
        base_logits = prompt_logits(model(images=images), backbone)
    model.set_classnames(["airplane", "ship"])  # pointed at novel classes when saved
    save_prompt(model, tmp_path / "prompt")
    loaded = load_prompt(tmp_path / "prompt", backbone).eval()
    assert loaded.head_classnames == BASE and loaded.classnames == ["airplane", "ship"]
    loaded.set_classnames(BASE)
    with torch.no_grad():
        torch.testing.assert_close(prompt_logits(loaded(images=images), backbone), base_logits, rtol=0, atol=0)
    # Started from the saved prompt on other classes (vlprompt test --model.init_prompt), the head
    # comes with its classes and the tensors load.
    module = PromptClassifier(backbone, functools.partial(DecoupledDePTPromptLearner, learner_args={"n_ctx": 4}),
                              ["airplane", "ship"], init_prompt=str(tmp_path / "prompt"))
    assert module.prompt_learner.head_classnames == BASE
    assert torch.equal(module.prompt_learner.head.weight, loaded.head.weight)


def test_fit_trains_the_head_at_its_rate_and_a_checkpoint_tests_on_novel_classes(backbone, dassl_folder, tmp_path):
    seen = []

    class LearningRates(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    dm = FewShotDataModule(str(dassl_folder), shots=4, batch_size=4, num_workers=0, subset="base")
    dm.setup("fit")
    factory = functools.partial(DecoupledDePTPromptLearner, learner_args={"n_ctx": 4})
    model = PromptClassifier(backbone, factory, dm.classnames, warmup_epochs=1,
                             optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))
    head_before = model.prompt_learner.head.weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=tmp_path, callbacks=[LearningRates()])
    trainer.fit(model, datamodule=dm)
    assert seen[0] == [1e-5, 1e-5]  # Dassl's constant warm-up: every group at warmup_lr
    after_warmup = seen[len(seen) // 3]
    assert after_warmup[1] == pytest.approx(6.5 * after_warmup[0]) and after_warmup[0] == pytest.approx(0.01)
    assert not torch.equal(model.prompt_learner.head.weight, head_before)
    # The checkpoint (prompt and head) tests on the novel classes: CLIP's logits only.
    ckpt = next(tmp_path.rglob("*.ckpt"))
    novel = FewShotDataModule(str(dassl_folder), shots=4, batch_size=4, num_workers=0, subset="novel")
    novel.setup("test")
    tester = PromptClassifier(backbone, factory, novel.classnames)
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(tester, datamodule=novel, ckpt_path=ckpt)
    assert tester.prompt_learner.head_classnames == model.prompt_learner.head_classnames
    assert torch.equal(tester.prompt_learner.head.weight, model.prompt_learner.head.weight)
    assert tester.prompt_learner._head_rows is None
