"""Seeded augmentation and the augmented feature bank: views are a function of (seed, image content,
epoch); training with the bank gives the prompt training without it gives (to float32 rounding); a
second run over the same images encodes nothing; bad set-ups get clear errors."""

from __future__ import annotations

import dataclasses
import shutil

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vlprompt.data import FewShotDataModule
from vlprompt.data.images import ImageDataset, collate_skipping
from vlprompt.methods import PromptClassifier
from vlprompt.methods.feature_bank import FeatureBank
from vlprompt.prompts import CoOpPromptLearner, KgCoOpPromptLearner


def _data(root, tmp_path, data_class=FewShotDataModule, **kw):
    options = dict(shots=-1, batch_size=4, num_workers=0, augment=True, augment_seed=0, fewshot_dir=str(tmp_path / "fs"))
    dm = data_class(root=str(root), **{**options, **kw})
    dm.setup("fit")
    return dm


def test_views_follow_the_image_content_and_epoch_not_the_index(dassl_folder, tmp_path):
    dm = _data(dassl_folder, tmp_path)
    train = dm.dataset("train")
    reversed_data = ImageDataset(train.samples[::-1], train.transform, transform_key=train.transform_key,
                                 augment_seed=0)
    first, last = train.item(0, epoch=3)["image"], reversed_data.item(len(train) - 1, epoch=3)["image"]
    assert torch.equal(first, last)  # same image, other place: same view
    assert not torch.equal(first, train.item(0, epoch=4)["image"])  # another epoch: another view
    train.set_epoch(3)
    assert torch.equal(train[0]["image"], first)
    # A copy of the file elsewhere is the same image.
    copy = tmp_path / "copy.png"
    shutil.copy(train.samples[0].path, copy)
    alone = ImageDataset([dataclasses.replace(train.samples[0], path=str(copy))], train.transform,
                         transform_key=train.transform_key, augment_seed=0)
    assert torch.equal(alone.item(0, epoch=3)["image"], first)
    other_seed = ImageDataset(train.samples, train.transform, transform_key=train.transform_key, augment_seed=1)
    assert not torch.equal(other_seed.item(0, epoch=3)["image"], first)


def test_a_batch_fetched_for_another_epoch_is_remade(dassl_folder, tmp_path):
    train = _data(dassl_folder, tmp_path).dataset("train")
    collate = lambda epoch: collate_skipping([train.item(i, epoch) for i in (3, 0, 7)])  # noqa: E731
    batch = collate(0)
    assert train.remake_stale(batch, 0) == 0  # current: left alone
    assert train.remake_stale(batch, 2) == 3
    expected = collate(2)
    assert torch.equal(batch["image"], expected["image"]) and torch.equal(batch["epoch"], expected["epoch"])
    assert batch["index"].tolist() == [3, 0, 7] and batch["skipped"] == []


def _fit(backbone, dm, tmp_path, learner=CoOpPromptLearner, epochs=2, model_class=PromptClassifier,
         ckpt_path=None, checkpoint=False, **kw):
    pl.seed_everything(0, verbose=False)
    model = model_class(backbone, learner, dm.classnames, **kw)
    checkpoints = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)] if checkpoint else []
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, callbacks=checkpoints,
                         enable_checkpointing=checkpoint,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def _assert_same_training(ctx, expected):
    """Equal to float32 rounding: the bank encodes views in batches of up to 256, a training step in
    batches of 4, and kernels may sum in another order (~1e-7 relative per feature), grown over the
    SGD steps to ~1e-6 of the prompt's size. float16 storage moves the prompt by ~1e-4 of its size."""
    ctx, expected = ctx.detach(), expected.detach()
    torch.testing.assert_close(ctx, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)


class _CheckingViews(PromptClassifier):
    """Counts training batches whose images are not the dataset's views at the current epoch."""

    wrong = 0

    def training_step(self, batch, batch_idx):
        train = self.trainer.datamodule.dataset("train")
        views = torch.stack([train.item(i, self.current_epoch)["image"] for i in batch["index"].tolist()])
        type(self).wrong += not torch.equal(batch["image"].cpu(), views)
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_a_resumed_run_with_loader_workers_trains_on_the_resumed_epochs_views(backbone, dassl_folder, tmp_path):
    # The loader's workers start fetching before Lightning restores the epoch from the checkpoint.
    _fit(backbone, _data(dassl_folder, tmp_path, num_workers=2), tmp_path, epochs=2, checkpoint=True)
    _CheckingViews.wrong = 0
    _fit(backbone, _data(dassl_folder, tmp_path, num_workers=2), tmp_path, epochs=4, model_class=_CheckingViews,
         checkpoint=True, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert _CheckingViews.wrong == 0


def test_training_with_the_bank_equals_training_without_and_reuses_views(backbone, dassl_folder, tmp_path):
    plain = _fit(backbone, _data(dassl_folder, tmp_path), tmp_path)
    bank_dir = tmp_path / "bank"
    banked = _fit(backbone, _data(dassl_folder, tmp_path), tmp_path, feature_bank=str(bank_dir))
    _assert_same_training(banked.prompt_learner.ctx, plain.prompt_learner.ctx)
    assert banked.feature_bank.encoded == 32 * 2  # 32 training images, 2 epochs
    # Another method over the same images: every view is already stored.
    again = _fit(backbone, _data(dassl_folder, tmp_path), tmp_path, learner=KgCoOpPromptLearner,
                 feature_bank=str(bank_dir))
    assert again.feature_bank.encoded == 0
    # Fewer shots: a subset of the same images, still nothing to encode; a third epoch is new.
    fewer = _fit(backbone, _data(dassl_folder, tmp_path, shots=2, seed=3), tmp_path, epochs=3,
                 feature_bank=str(bank_dir))
    assert fewer.feature_bank.encoded == 8  # 4 classes x 2 shots, epoch 2 only


def test_half_precision_bank_is_close(backbone, dassl_folder, tmp_path):
    plain = _fit(backbone, _data(dassl_folder, tmp_path), tmp_path, epochs=1)
    half = _fit(backbone, _data(dassl_folder, tmp_path), tmp_path, epochs=1, feature_bank=str(tmp_path / "b16"),
                feature_bank_dtype="float16")
    torch.testing.assert_close(plain.prompt_learner.ctx, half.prompt_learner.ctx, atol=1e-4, rtol=1e-3)


def test_the_bank_needs_reproducible_views(backbone, dassl_folder, tmp_path):
    with pytest.raises(ValueError, match="augment_seed"):
        _fit(backbone, _data(dassl_folder, tmp_path, augment_seed=None), tmp_path, epochs=1,
             feature_bank=str(tmp_path / "bank"))


def test_other_weights_or_augmentation_use_other_folders(backbone, dassl_folder, tmp_path):
    train = _data(dassl_folder, tmp_path).dataset("train")
    bank = FeatureBank(tmp_path, backbone.identity)
    other_weights = FeatureBank(tmp_path, {**backbone.identity, "fingerprint": "0" * 16})
    wider_crops = _data(dassl_folder, tmp_path, crop_scale=(0.5, 1.0)).dataset("train")
    folders = {bank.folder(train, 0), other_weights.folder(train, 0), bank.folder(wider_crops, 0), bank.folder(train, 1)}
    assert len(folders) == 4


class _RecordingData(FewShotDataModule):
    """Records the training images' mode when Lightning asks for the training loader."""

    def train_dataloader(self):
        self.labels_only_at_start = self.dataset("train").labels_only
        return super().train_dataloader()


def test_the_loader_is_labels_only_before_its_workers_start(backbone, dassl_folder, tmp_path):
    # Lightning creates the first epoch's loader (and its workers start fetching) before any epoch
    # hook; switching the mode after that mixed images and placeholders in one batch.
    dm = _data(dassl_folder, tmp_path, data_class=_RecordingData)
    _fit(backbone, dm, tmp_path, epochs=1, feature_bank=str(tmp_path / "bank"))
    assert dm.labels_only_at_start
    assert not dm.dataset("train").labels_only  # back to images after the fit
    # Without the bank, a later fit on the same data decodes images from the start.
    _fit(backbone, dm, tmp_path, epochs=1)
    assert not dm.labels_only_at_start


@pytest.mark.slow
def test_loader_workers_see_the_epoch(backbone, dassl_folder, tmp_path):
    # Persistent worker processes read the epoch from shared memory: still the bank's views.
    plain = _fit(backbone, _data(dassl_folder, tmp_path, num_workers=2), tmp_path, epochs=3)
    banked = _fit(backbone, _data(dassl_folder, tmp_path, num_workers=2), tmp_path, epochs=3,
                  feature_bank=str(tmp_path / "bank"))
    _assert_same_training(banked.prompt_learner.ctx, plain.prompt_learner.ctx)


def test_unreadable_images_are_skipped_and_counted_the_same(backbone, dassl_folder, tmp_path):
    data = _data(dassl_folder, tmp_path)
    broken = data.dataset("train").samples[5].path
    open(broken, "wb").write(b"not a png")
    plain = _fit(backbone, _data(dassl_folder, tmp_path), tmp_path)
    banked = _fit(backbone, _data(dassl_folder, tmp_path), tmp_path, feature_bank=str(tmp_path / "bank"))
    assert plain.unreadable.count("train") == banked.unreadable.count("train") == 1
    _assert_same_training(banked.prompt_learner.ctx, plain.prompt_learner.ctx)
