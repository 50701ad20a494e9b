"""PromptClassifier: training, checkpoints, resume, NaN guard, feature cache, novel classes."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vlprompt.data import FewShotDataModule
from vlprompt.methods import PromptClassifier, warmup_cosine
from vlprompt.prompts import CoCoOpPromptLearner, CoOpPromptLearner, save_prompt

COOP = functools.partial(CoOpPromptLearner, n_ctx=4)


def adam(params):
    return torch.optim.Adam(params, lr=0.05)


def trainer(tmp_path, **kw):
    defaults = dict(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kw})


def datamodule(root, **kw):
    return FewShotDataModule(str(root), **{"shots": 4, "num_workers": 0, "batch_size": 8, "augment": False, **kw})


def mean_loss(model, dm):
    dm.setup("fit")
    model.eval()
    with torch.no_grad():
        batch = next(iter(torch.utils.data.DataLoader(dm.datasets["train"], batch_size=64, collate_fn=dm.train_dataloader().collate_fn)))
        return torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"]).item()


def test_fit_lowers_loss_and_checkpoint_holds_only_the_prompt(backbone, dassl_folder, tmp_path):
    pl.seed_everything(0)
    dm = datamodule(dassl_folder)
    model = PromptClassifier(backbone, COOP, dm.classnames, optimizer=adam, lr_scheduler="constant")
    dm.set_preprocess(backbone.preprocess_cfg)
    before = mean_loss(model, dm)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_epochs=15, callbacks=[ckpt], enable_checkpointing=True).fit(model, datamodule=dm)
    assert mean_loss(model, dm) < before - 0.1
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert list(state["state_dict"]) == ["prompt_learner.ctx"]
    assert state["vlprompt"]["backbone"] == backbone.identity
    # The checkpoint loads back into a fresh model with the same backbone.
    restored = PromptClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", backbone=backbone, prompt_learner=COOP)
    assert torch.equal(restored.prompt_learner.ctx, model.prompt_learner.ctx)


def test_interrupted_fit_resumes_from_its_checkpoint(backbone, dassl_folder, tmp_path):
    dm = datamodule(dassl_folder)
    pl.seed_everything(0)
    model = PromptClassifier(backbone, COOP, dm.classnames)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer(tmp_path, max_epochs=2, callbacks=[ckpt], enable_checkpointing=True)
    first.fit(model, datamodule=dm)
    steps = first.global_step
    resumed_model = PromptClassifier(backbone, COOP, dm.classnames)
    second = trainer(tmp_path, max_epochs=4, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")], enable_checkpointing=True)
    second.fit(resumed_model, datamodule=dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.current_epoch == 4 and second.global_step == 2 * steps


def test_checkpoint_from_another_backbone_is_refused(backbone, dassl_folder, tmp_path):
    from conftest import make_backbone
    from vlprompt.backbones import BackboneMismatchError

    dm = datamodule(dassl_folder)
    model = PromptClassifier(backbone, COOP, dm.classnames)
    t = trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)])
    t.fit(model, datamodule=dm)
    other = make_backbone(tmp_path / "other", seed=7)
    with pytest.raises(BackboneMismatchError):
        PromptClassifier.load_from_checkpoint(tmp_path / "c" / "last.ckpt", backbone=other, prompt_learner=COOP)


def test_nan_loss_stops_training_with_a_clear_message(backbone, dassl_folder, tmp_path):
    dm = datamodule(dassl_folder)
    model = PromptClassifier(backbone, COOP, dm.classnames)
    with torch.no_grad():
        model.prompt_learner.ctx.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training loss became nan"):
        trainer(tmp_path).fit(model, datamodule=dm)


@pytest.mark.parametrize("factory", [COOP, functools.partial(CoCoOpPromptLearner, meta_reduction=4)], ids=["coop", "cocoop"])
def test_feature_cache_is_exact(backbone, dassl_folder, tmp_path, factory):
    dm = datamodule(dassl_folder)
    cached = PromptClassifier(backbone, factory, dm.classnames, cache_image_features=True)
    plain = PromptClassifier(backbone, factory, dm.classnames, cache_image_features=False)
    plain.prompt_learner.load_state_dict(cached.prompt_learner.state_dict())
    first = trainer(tmp_path).test(cached, datamodule=dm, verbose=False)[0]["test/acc"]
    assert len(next(iter(cached._feature_cache.values()))) == 24  # every test image cached
    second = trainer(tmp_path).test(cached, datamodule=dm, verbose=False)[0]["test/acc"]  # from cache
    reference = trainer(tmp_path).test(plain, datamodule=dm, verbose=False)[0]["test/acc"]
    assert first == second == reference
    batch = next(iter(dm.test_dataloader()))
    feats = cached._cached_image_features(batch, "test")
    assert torch.equal(feats, backbone.encode_image(batch["image"]))


def test_training_cache_only_without_augmentation(backbone, dassl_folder, tmp_path):
    dm = datamodule(dassl_folder, augment=True)
    model = PromptClassifier(backbone, COOP, dm.classnames)
    trainer(tmp_path).fit(model, datamodule=dm)
    assert not any(k.startswith("train") for k in model._feature_cache)
    model = PromptClassifier(backbone, COOP, dm.classnames, cache_augmented_train=True)
    trainer(tmp_path).fit(model, datamodule=dm)
    assert any(k.startswith("train") for k in model._feature_cache)


def test_test_on_novel_classes_repoints_the_prompt(backbone, dassl_folder, tmp_path):
    base = datamodule(dassl_folder, subset="base")
    model = PromptClassifier(backbone, COOP, base.classnames)
    trainer(tmp_path).fit(model, datamodule=base)
    novel = datamodule(dassl_folder, subset="novel")
    trainer(tmp_path).test(model, datamodule=novel, verbose=False)
    assert model.prompt_learner.classnames == novel.classnames
    assert set(model.per_class_accuracy) == set(novel.classnames)


def test_init_prompt_and_save_never_overwrites(backbone, dassl_folder, tmp_path):
    dm = datamodule(dassl_folder)
    source = COOP(backbone, dm.classnames)
    with torch.no_grad():
        source.ctx.normal_()
    save_prompt(source, tmp_path / "p")
    model = PromptClassifier(backbone, COOP, dm.classnames, init_prompt=str(tmp_path / "p"))
    assert torch.equal(model.prompt_learner.ctx, source.ctx)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_prompt(tmp_path / "p")
    model.save_prompt(tmp_path / "p", overwrite=True)
    with pytest.raises(ValueError, match="holds a 'coop' prompt"):
        PromptClassifier(backbone, CoCoOpPromptLearner, dm.classnames, init_prompt=str(tmp_path / "p"))


def test_missing_classnames_is_a_clear_error(backbone):
    with pytest.raises(ValueError, match="needs class names"):
        PromptClassifier(backbone, COOP, None)


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10, warmup_factor=0.01)
    assert f(0) == f(9) == 0.01 and f(10) == 1.0
    assert 0.49 < f(55) < 0.51 and f(100) == pytest.approx(0.0)
