"""TPT: episodic reset, confidence selection, the entropy objective, the Lightning loop."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from vlprompt.data import FewShotDataModule
from vlprompt.methods import TestTimePromptTuning
from vlprompt.prompts import IVLPPromptLearner
from vlprompt.tta import TestTimeViews, confident_views, marginal_entropy

CLASSES = ["red square", "green square", "blue square", "yellow square"]


def test_selection_keeps_exactly_the_lowest_entropy_views():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=g) * torch.linspace(0.1, 5, 64)[:, None]
    keep = confident_views(logits, 0.1)
    p = logits.softmax(-1)
    entropy = [-(row * row.log()).sum().item() for row in p]
    assert sorted(keep.tolist()) == sorted(np.argsort(entropy)[:6].tolist())
    assert len(confident_views(logits[:5], 0.1)) == 1  # never empty
    with pytest.raises(ValueError):
        confident_views(logits, 0.0)


def test_marginal_entropy_is_the_entropy_of_the_mean_prediction():
    logits = torch.randn(6, 4)
    mean = logits.softmax(-1).mean(0)
    assert torch.allclose(marginal_entropy(logits), -(mean * mean.log()).sum(), atol=1e-6)
    assert math.isclose(marginal_entropy(torch.zeros(3, 4)).item(), math.log(4), rel_tol=1e-6)


def test_views_are_the_original_then_random_views_seeded_by_content(backbone):
    views = TestTimeViews(backbone.preprocess_cfg, n_views=5, augmix=True)
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    va = views(a)
    assert va.shape == (5, 3, 32, 32)
    views(b)  # another image in between changes nothing
    assert torch.equal(views(a), va)
    assert torch.equal(va[0], views.original(a))
    assert not torch.equal(va[1], va[2])


def _model(backbone, **kwargs):
    torch.manual_seed(0)
    return TestTimePromptTuning(backbone, classnames=CLASSES, n_views=8, **kwargs)


def _views(n=8, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_each_image_starts_from_the_same_prompt_and_optimiser_state(backbone):
    model = _model(backbone, steps=2)
    start = {k: v.clone() for k, v in model.prompt_learner.state_dict().items()}
    alone = model.adapt_and_predict(_views(seed=2))
    model.adapt_and_predict(_views(seed=1))
    after_other = model.adapt_and_predict(_views(seed=2))
    assert torch.equal(alone, after_other)  # image 2's prediction does not depend on image 1
    optimizer = model._episode_start[2]
    assert all(s["step"].item() == 2 for s in optimizer.state.values())  # this episode's steps only
    assert not torch.equal(model.prompt_learner.ctx, start["ctx"])  # it did adapt...
    model._restore_start()
    assert torch.equal(model.prompt_learner.ctx, start["ctx"])  # ...and the start is kept


def test_zero_steps_is_zero_shot_with_the_initial_prompt(backbone):
    from vlprompt.prompts import PromptOutput, ZeroShotPrompt

    model = _model(backbone, steps=0)
    views = _views()
    expected = ZeroShotPrompt(backbone, CLASSES).text_features()
    ref = model.logits(PromptOutput(backbone.encode_image(views[:1]), expected))
    assert torch.allclose(model.adapt_and_predict(views), ref[0], atol=1e-4)


def test_a_step_lowers_the_entropy_of_the_confident_views(backbone):
    model = _model(backbone, steps=1, optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))
    views = _views()
    with torch.no_grad():
        logits = model.logits(model.prompt_learner(images=views))
        keep = confident_views(logits, 0.25)
        before = marginal_entropy(logits[keep])
    model.selection_ratio = 0.25
    model.adapt_and_predict(views)
    with torch.no_grad():
        after = marginal_entropy(model.logits(model.prompt_learner(images=views[keep])))
    assert after < before


def test_visual_prompt_learners_adapt_too(backbone):
    model = TestTimePromptTuning(backbone, lambda b, c: IVLPPromptLearner(b, c, text_depth=2, vision_depth=2),
                                 CLASSES, n_views=4, selection_ratio=0.5)
    assert model.adapt_and_predict(_views(4)).shape == (4,)


def test_lightning_test_and_predict_on_a_folder(backbone, image_folder, tmp_path):
    dm = FewShotDataModule(str(image_folder), shots=-1, batch_size=2, eval_batch_size=2, num_workers=0)
    model = TestTimePromptTuning(backbone, classnames=dm.classnames, n_views=4, selection_ratio=0.5)
    trainer = pl.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    preds = trainer.predict(model, datamodule=dm)
    assert sum(len(p["prediction"]) for p in preds) == len(dm.datasets["test"]) == metrics["test/images"]
    # Episodes are independent and seeded by image content: test and predict agree image by image.
    labels = torch.tensor([dm.datasets["test"].samples[i].label for p in preds for i in p["index"].tolist()])
    predicted = torch.cat([p["prediction"] for p in preds])
    assert metrics["test/acc"] == pytest.approx((predicted == labels).float().mean().item())
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path).test(model, datamodule=dm, verbose=False)


def test_a_non_finite_loss_keeps_the_starting_prediction_and_is_counted(backbone, monkeypatch):
    import vlprompt.methods.tta as tta

    views = _views()
    zero_step = _model(backbone, steps=0).adapt_and_predict(views)
    model = _model(backbone, steps=2)
    start = model.prompt_learner.ctx.detach().clone()
    monkeypatch.setattr(tta, "marginal_entropy", lambda logits: logits.sum() * float("nan"))
    logits = model.adapt_and_predict(views)
    assert model.unadapted_images == 1
    assert torch.allclose(logits, zero_step, atol=1e-5)  # the starting prompt's prediction
    assert torch.equal(model.prompt_learner.ctx, start)  # no step was taken


def test_mixed_precision_comes_from_lightning(backbone, image_folder, tmp_path):
    dm = FewShotDataModule(str(image_folder), shots=-1, batch_size=2, eval_batch_size=4, num_workers=0)
    model = TestTimePromptTuning(backbone, classnames=dm.classnames, n_views=4, selection_ratio=0.5)
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", inference_mode=False, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    preds = trainer.predict(model, datamodule=dm)
    confidence = torch.cat([p["confidence"] for p in preds])
    assert len(confidence) == len(dm.datasets["test"]) and torch.isfinite(confidence).all()
    assert model.unadapted_images == 0
