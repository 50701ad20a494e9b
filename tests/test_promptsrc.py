"""PromptSRC: regularisers against the frozen model and Gaussian prompt aggregation."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from vlprompt.prompts import PromptOutput, PromptSRCPromptLearner
from vlprompt.prompts.promptsrc import gaussian_epoch_weights

SMALL = {"text_depth": 2, "vision_depth": 2, "templates": "imagenet7"}


def test_gaussian_weights():
    w = gaussian_epoch_weights(20, mean=15, std=1)
    assert math.isclose(sum(w), 1.0) and max(range(20), key=w.__getitem__) == 14  # epoch 15
    assert math.isclose(w[13] / w[14], math.exp(-0.5))
    assert w[0] < 1e-20
    with pytest.raises(ValueError):
        gaussian_epoch_weights(5, mean=1000, std=0.1)


def test_regularisers_vanish_when_the_prompted_model_agrees_with_the_frozen_one(backbone):
    src = PromptSRCPromptLearner(backbone, ["cat", "dog"], **SMALL)
    frozen_text = src.frozen_text(backbone, src.classnames)
    frozen_image = torch.randn(3, backbone.embed_dim)
    logits = backbone.logit_scale * F.normalize(frozen_image, dim=-1) @ frozen_text.t()
    agree = PromptOutput(frozen_image, frozen_text, extras={"frozen_image_features": frozen_image})
    assert src.extra_loss(agree, logits, None).abs() < 1e-5
    shifted = PromptOutput(frozen_image + 1, frozen_text, extras={"frozen_image_features": frozen_image})
    image_term = 10 * F.l1_loss(F.normalize(frozen_image + 1, dim=-1), F.normalize(frozen_image, dim=-1))
    assert torch.allclose(src.extra_loss(shifted, logits, None), image_term, atol=1e-5)


def test_frozen_image_features_only_in_training(backbone):
    src = PromptSRCPromptLearner(backbone, ["cat", "dog"], **SMALL)
    x = torch.randn(2, 3, 32, 32)
    src.eval()
    assert "frozen_image_features" not in src(images=x).extras
    src.train()
    out = src(images=x)
    assert torch.equal(out.extras["frozen_image_features"], backbone.encode_image(x))


def test_aggregation_replaces_the_prompt_by_the_weighted_average(backbone):
    src = PromptSRCPromptLearner(backbone, ["cat"], **SMALL, gpa_mean=2.0, gpa_std=1.0)
    snapshots = []
    for epoch in range(3):
        with torch.no_grad():
            for p in src.parameters():
                p.normal_()
        snapshots.append({n: p.detach().clone() for n, p in src.named_parameters()})
        src.on_train_epoch_end(epoch, 3)
    state = src.training_state()  # what a checkpoint keeps for resuming
    src.on_train_end()
    w = gaussian_epoch_weights(3, 2.0, 1.0)
    for name, p in src.named_parameters():
        expected = sum(wi * s[name] for wi, s in zip(w, snapshots))
        assert torch.allclose(p, expected, atol=1e-6)
    resumed = PromptSRCPromptLearner(backbone, ["cat"], **SMALL, gpa_mean=2.0, gpa_std=1.0)
    resumed.load_training_state(state)
    resumed.on_train_end()
    assert all(torch.allclose(a, b) for a, b in zip(resumed.parameters(), src.parameters()))


def test_fit_applies_the_aggregate_and_checkpoints_keep_it(backbone, dassl_folder, tmp_path):
    from vlprompt.data import FewShotDataModule
    from vlprompt.methods import PromptClassifier

    dm = FewShotDataModule(dassl_folder, shots=2, batch_size=4, num_workers=0)
    model = PromptClassifier(backbone, lambda b, c: PromptSRCPromptLearner(b, c, **SMALL), dm.classnames,
                             lr_scheduler="constant")
    seen = []

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            seen.append(module.prompt_learner.ctx.detach().clone())

    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                         callbacks=[Snapshot(), pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(model, datamodule=dm)
    w = gaussian_epoch_weights(3, 0.75 * 3, 1.0)
    expected = sum(wi * s for wi, s in zip(w, seen))
    assert torch.allclose(model.prompt_learner.ctx, expected, atol=1e-6)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert "gpa_sum.ctx" in ckpt["vlprompt"]["learner_state"]
