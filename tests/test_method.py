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
    assert len(cached.feature_cache) == 24  # every test image cached
    encode = cached.prompt_learner.encode_images
    cached.prompt_learner.encode_images = None  # a second test must not encode anything
    second = trainer(tmp_path).test(cached, datamodule=dm, verbose=False)[0]["test/acc"]
    cached.prompt_learner.encode_images = encode
    reference = trainer(tmp_path).test(plain, datamodule=dm, verbose=False)[0]["test/acc"]
    assert first == second == reference
    batch = next(iter(dm.test_dataloader()))
    feats = cached.feature_cache.features(dm.dataset("test").fingerprint, batch["index"], batch["image"], None)
    assert torch.equal(feats, backbone.encode_image(batch["image"]))


def test_training_cache_only_without_augmentation(backbone, dassl_folder, tmp_path):
    dm = datamodule(dassl_folder, augment=True)
    model = PromptClassifier(backbone, COOP, dm.classnames)
    trainer(tmp_path).fit(model, datamodule=dm)
    train, val = dm.dataset("train").fingerprint, dm.dataset("val").fingerprint
    assert train not in model.feature_cache.datasets() and val in model.feature_cache.datasets()
    model = PromptClassifier(backbone, COOP, dm.classnames, cache_augmented_train=True)
    trainer(tmp_path).fit(model, datamodule=dm)
    assert train in model.feature_cache.datasets()


def _copy_with_classes_rotated(source, target):
    """The same class names, each now shown with the next class's images (other files)."""
    import json
    import shutil

    shutil.copytree(source, target)
    split = json.loads((target / "split_zhou_Colours.json").read_text())
    names = {label: name for rows in split.values() for _, label, name in rows}
    for rows in split.values():
        for row in rows:
            row[1] = (row[1] + 1) % len(names)
            row[2] = names[row[1]]
    (target / "split_zhou_Colours.json").write_text(json.dumps(split))
    return target


def test_cached_features_follow_the_data_not_its_class_names(backbone, dassl_folder, tmp_path):
    """ImageNet and ImageNet-V2 share class names: testing one after the other with one model must
    not reuse the first one's image features for the second."""
    pl.seed_everything(0)
    first = datamodule(dassl_folder)
    model = PromptClassifier(backbone, COOP, first.classnames, optimizer=adam, lr_scheduler="constant")
    trainer(tmp_path, max_epochs=15).fit(model, datamodule=first)
    second = datamodule(_copy_with_classes_rotated(dassl_folder, tmp_path / "rotated"))
    assert second.classnames == first.classnames
    acc_first = trainer(tmp_path).test(model, datamodule=first, verbose=False)[0]["test/acc"]
    acc_second = trainer(tmp_path).test(model, datamodule=second, verbose=False)[0]["test/acc"]
    uncached = PromptClassifier(backbone, COOP, first.classnames, cache_image_features=False)
    uncached.prompt_learner.load_state_dict(model.prompt_learner.state_dict())
    assert acc_second == trainer(tmp_path).test(uncached, datamodule=second, verbose=False)[0]["test/acc"]
    assert acc_first > 0.9 and acc_second < 0.5  # each got its own accuracy
    assert len(model.feature_cache.datasets()) >= 2


def test_per_class_mean_leaves_out_classes_without_test_images(backbone, dassl_folder, tmp_path):
    import json

    split_file = dassl_folder / "split_zhou_Colours.json"
    split = json.loads(split_file.read_text())
    split["test"] = [row for row in split["test"] if row[1] != 3]
    split_file.write_text(json.dumps(split))
    dm = datamodule(dassl_folder)
    model = PromptClassifier(backbone, COOP, dm.classnames)
    metrics = trainer(tmp_path).test(model, datamodule=dm, verbose=False)[0]
    per_class = model.per_class_accuracy
    assert per_class[dm.classnames[3]] is None and metrics["test/images"] == 18
    scored = [a for a in per_class.values() if a is not None]
    assert metrics["test/acc_per_class_mean"] == pytest.approx(sum(scored) / 3)


def test_resumed_fit_equals_an_uninterrupted_one(backbone, dassl_folder, tmp_path):
    """Shuffling and random augmentation continue where they stopped: the random state is saved in
    the checkpoint and restored."""
    class InterruptAfterTwoEpochs(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch >= 1

    def run(callbacks=(), ckpt_path=None):
        dm = datamodule(dassl_folder, augment=True, batch_size=4)
        pl.seed_everything(3)
        model = PromptClassifier(backbone, COOP, dm.classnames, cache_image_features=False)
        callbacks = [*callbacks, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
        trainer(tmp_path, max_epochs=4, callbacks=callbacks, enable_checkpointing=True,
                limit_val_batches=0).fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.prompt_learner.ctx.detach().clone()

    interrupted = run([InterruptAfterTwoEpochs()])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # no pickle needed
    assert any("RandomStateCheckpoint" in key for key in state["callbacks"]) and state["epoch"] == 1
    resumed = run(ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    uninterrupted = run()
    assert not torch.equal(interrupted, uninterrupted)
    assert torch.equal(resumed, uninterrupted)


def test_unreadable_images_are_counted_once(backbone, dassl_folder, tmp_path):
    broken = sorted((dassl_folder / "images").rglob("test_*.png"))[:2]
    for path in broken:
        path.write_bytes(b"not an image")
    dm = datamodule(dassl_folder, eval_batch_size=5)
    model = PromptClassifier(backbone, COOP, dm.classnames)
    for _ in range(2):  # the same bad files met again are not counted again
        metrics = trainer(tmp_path).test(model, datamodule=dm, verbose=False)[0]
    assert model.unreadable.count("test") == 2 and metrics["test/unreadable_images"] == 2
    assert metrics["test/images"] == 22


def test_scoring_is_clip_zero_shot(backbone):
    """The shared scorer gives exactly open_clip's zero-shot logits for the hand-written prompt."""
    from vlprompt.methods.scoring import prompt_logits
    from vlprompt.prompts import ZeroShotPrompt

    names = ["red square", "green square", "blue square"]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    learner = ZeroShotPrompt(backbone, names, templates="a photo of a {}.")
    clip = backbone.model
    with torch.no_grad():
        image = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)
        text = torch.nn.functional.normalize(clip.encode_text(backbone.tokenize([f"a photo of a {n}." for n in names])), dim=-1)
        expected = clip.logit_scale.exp() * image @ text.t()
        assert torch.allclose(prompt_logits(learner(images=images), backbone), expected, atol=1e-5)


def test_test_on_novel_classes_repoints_the_prompt(backbone, dassl_folder, tmp_path):
    base = datamodule(dassl_folder, subset="base")
    model = PromptClassifier(backbone, COOP, base.classnames)
    trainer(tmp_path).fit(model, datamodule=base)
    novel = datamodule(dassl_folder, subset="novel")
    trainer(tmp_path).test(model, datamodule=novel, verbose=False)
    assert model.prompt_learner.classnames == novel.classnames
    assert set(model.per_class_accuracy) == set(novel.classnames)
    assert len(model.test_counts.correct) == len(novel.classnames) == 2


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
