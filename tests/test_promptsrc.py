"""PromptSRC: regularisers against the frozen model and Gaussian prompt aggregation."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from vlprompt.prompts import PromptOutput, PromptSRCPromptLearner
from vlprompt.methods.prompt_averaging import GaussianPromptAggregation, gaussian_epoch_weights

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


def test_fit_applies_the_aggregate_and_an_interrupted_fit_keeps_it(backbone, dassl_folder, tmp_path):
    """GPA is a callback: the prompt after fit is the Gaussian-weighted average of the per-epoch
    prompts; its running sums live in the checkpoint, so a resumed fit ends with the same prompt."""
    from vlprompt.data import FewShotDataModule
    from vlprompt.methods import PromptClassifier

    class Snapshot(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_epoch_end(self, trainer, module):
            self.seen.append(module.prompt_learner.ctx.detach().clone())

    class Interrupt(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = trainer.current_epoch >= 1

    def fit(*callbacks, ckpt_path=None, dirpath=None):
        dm = FewShotDataModule(dassl_folder, shots=2, batch_size=4, num_workers=0, augment=False)
        pl.seed_everything(0)
        model = PromptClassifier(backbone, lambda b, c: PromptSRCPromptLearner(b, c, **SMALL), dm.classnames,
                                 lr_scheduler="constant")
        frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                             callbacks=[*callbacks, GaussianPromptAggregation(),
                                        pl.callbacks.ModelCheckpoint(dirpath=dirpath or tmp_path / "other",
                                                                     save_last=True)])
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        assert all(torch.equal(v, frozen[k]) for k, v in backbone.state_dict().items())  # prompt only
        return model.prompt_learner.ctx.detach().clone()

    snapshot = Snapshot()
    final = fit(snapshot)
    w = gaussian_epoch_weights(3, 0.75 * 3, 1.0)
    assert torch.allclose(final, sum(wi * s for wi, s in zip(w, snapshot.seen)), atol=1e-6)
    assert not torch.allclose(final, snapshot.seen[-1])
    fit(Interrupt(), dirpath=tmp_path / "interrupted")
    ckpt = torch.load(tmp_path / "interrupted" / "last.ckpt", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if "GaussianPromptAggregation" in k)
    assert state["weight"] == pytest.approx(sum(w[:2]))
    resumed = fit(ckpt_path=str(tmp_path / "interrupted" / "last.ckpt"))
    assert torch.allclose(resumed, final, atol=1e-6)


def test_frozen_text_anchor_is_the_reference_raw_mean_of_60_templates(backbone):
    from open_clip import zero_shot_metadata

    from vlprompt.prompts.templates import resolve_templates

    names = ["cat", "golden retriever"]
    templates = resolve_templates("promptsrc60")
    clip80 = [t("{}") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    assert len(set(templates)) == 60 and set(templates) <= set(clip80) and templates[0] == "a photo of a {}."
    depths = {"text_depth": 2, "vision_depth": 2}
    src = PromptSRCPromptLearner(backbone, names, **depths)  # the defaults: promptsrc60, raw mean
    with torch.no_grad():
        raw = torch.stack([backbone.encode_text([t.format(n) for n in names]) for t in templates], dim=1).mean(dim=1)
    assert torch.allclose(src.frozen_text(backbone, names), F.normalize(raw, dim=-1), atol=1e-6)
    clip = PromptSRCPromptLearner(backbone, names, **depths, templates="imagenet80", ensemble="clip")
    with torch.no_grad():
        per = torch.stack([F.normalize(backbone.encode_text([t.format(n) for n in names]), dim=-1) for t in clip80])
    assert torch.allclose(clip.frozen_text(backbone, names), F.normalize(per.mean(0), dim=-1), atol=1e-6)
    assert not torch.allclose(clip.frozen_text(backbone, names), src.frozen_text(backbone, names), atol=1e-4)
