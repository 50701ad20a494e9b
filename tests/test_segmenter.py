"""PromptSegmenter: prompts reach the towers, gradients reach only what is trained, training
lowers the loss, checkpoints and decoder weights hold the learned tensors only."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from test_prompt_contract import TINY_KWARGS
from vlprompt.data.classnames import with_full_stop
from vlprompt.data import ShapeWorldSegmentationDataModule
from vlprompt.methods import PromptSegmenter
from vlprompt.methods.segmentation import load_decoder_weights, save_decoder_weights
from vlprompt.prompts import PROMPT_LEARNERS

pytest.importorskip("monai")

PROMPTS = ["red star", "blue circle", "red star"]


def learner(name):
    return functools.partial(PROMPT_LEARNERS[name], **TINY_KWARGS.get(name, {}))


def images(n=3, seed=0):
    """Random images, the third a copy of the first (it is paired with the same prompt)."""
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    x[2] = x[0]
    return x


@pytest.mark.parametrize("name", ["coop", "cocoop", "vpt", "maple", "upt", "ivlp"])
def test_a_prompt_change_changes_the_masks_and_only_prompts_get_gradients(name, backbone):
    torch.manual_seed(0)
    # Reading the last block too, so every deep visual prompt is used (blocks after the deepest
    # layer read are not run, and their prompts get no gradient: CLIPSeg's depth limit).
    model = PromptSegmenter(backbone, learner(name), extract_layers=[0, 2], reduce_dim=16, n_heads=2)
    before = model(images(), PROMPTS)
    assert before.shape == (3, 1, 32, 32)
    # Same image and prompt; rows of one batch may be summed in another order (kernel tails, thread
    # splits): float32 rounding of logits of size ~1 is ~1e-7.
    assert torch.allclose(before[0], before[2], atol=1e-5) and not torch.allclose(before[0], before[1])
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = model(images(), PROMPTS)
    assert not torch.allclose(before, after)
    after.sum().backward()
    learned = [p for p in model.prompt_learner.parameters() if p.requires_grad]
    assert learned and all(p.grad is not None for p in learned)
    assert all(p.grad is None for p in model.decoder.parameters()) and all(p.grad is None for p in backbone.parameters())


def test_zero_shot_is_the_plain_model_and_a_trained_decoder_joins_the_gradients(backbone):
    torch.manual_seed(0)
    model = PromptSegmenter(backbone, reduce_dim=16, n_heads=2, train_decoder=True)
    layers = backbone.encode_image_layers(images(), model.decoder.extract_layers)
    texts = [with_full_stop(p) for p in PROMPTS]  # "{}": the prompt text as it is, ending in one stop
    plain = model.decoder(layers, backbone.encode_text(texts), backbone.vision_prefix_tokens, (32, 32))
    assert torch.allclose(model(images(), PROMPTS), plain, atol=1e-6)
    model(images(), PROMPTS).sum().backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.decoder.parameters()}
    with pytest.raises(ValueError, match="empty segmentation prompt"):
        model(images(), ["red star", " ", "x"])
    with pytest.raises(ValueError, match="nothing to fit"):
        PromptSegmenter(backbone, reduce_dim=16, n_heads=2).configure_optimizers()


def test_decoder_weights_round_trip_and_refuse_another_layout(backbone, tmp_path):
    torch.manual_seed(0)
    model = PromptSegmenter(backbone, reduce_dim=16, n_heads=2, train_decoder=True)
    path = save_decoder_weights(model.decoder, tmp_path / "decoder.safetensors")
    again = PromptSegmenter(backbone, learner("coop"), reduce_dim=16, n_heads=2, decoder_weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.decoder.state_dict().values(), again.decoder.state_dict().values()))
    with pytest.raises(ValueError, match="trained reading layers"):
        PromptSegmenter(backbone, reduce_dim=16, n_heads=2, extract_layers=[0, 2], decoder_weights=str(path))
    with pytest.raises(ValueError, match="does not fit"):
        load_decoder_weights(PromptSegmenter(backbone, reduce_dim=8, n_heads=2, train_decoder=True).decoder, path)
    # A decoder loaded from a file takes the width and heads it was built with.
    assert PromptSegmenter(backbone, decoder_weights=str(path)).decoder.film_mul.out_features == 16


def test_fit_lowers_the_loss_and_the_checkpoint_holds_no_encoder(backbone, tmp_path):
    pl.seed_everything(0)
    dm = ShapeWorldSegmentationDataModule(str(tmp_path / "seg"), domain="clean", batch_size=16, eval_batch_size=64,
                                          num_workers=0, augment=False)
    model = PromptSegmenter(backbone, learner("coop"), reduce_dim=16, n_heads=2, train_decoder=True,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), lr_scheduler="constant")
    trainer = lambda **kw: pl.Trainer(**{"accelerator": "cpu", "logger": False, "enable_progress_bar": False,  # noqa: E731
                                         "enable_model_summary": False, "num_sanity_val_steps": 0,
                                         "enable_checkpointing": False, "limit_val_batches": 0, **kw})
    before = trainer().test(model, datamodule=dm, verbose=False)[0]
    trainer(max_epochs=4, enable_checkpointing=True, default_root_dir=tmp_path).fit(model, datamodule=dm)
    after = trainer().test(model, datamodule=dm, verbose=False)[0]
    assert after["test/dice_dataset"] > before["test/dice_dataset"] + 0.1, (before, after)
    assert set(model.test_results) == {"dice_per_image", "iou_per_image", "dice_dataset", "iou_dataset"}
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("backbone.") for k in state) and any(k.startswith("decoder.") for k in state)
    assert "prompt_learner.ctx" in state


def test_cached_image_layers_are_exact_and_only_for_text_prompts(backbone, tmp_path):
    dm = ShapeWorldSegmentationDataModule(str(tmp_path / "seg"), domain="clean", batch_size=8, eval_batch_size=16,
                                          num_workers=0, augment=False)
    test = lambda model: pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,  # noqa: E731
                                    enable_model_summary=False).test(model, datamodule=dm, verbose=False)[0]
    for name, cached in (("coop", True), ("vpt", False)):
        torch.manual_seed(0)
        model = PromptSegmenter(backbone, learner(name), reduce_dim=16, n_heads=2, train_decoder=True)
        plain = PromptSegmenter(backbone, learner(name), reduce_dim=16, n_heads=2, train_decoder=True,
                                cache_image_layers=False)
        plain.load_state_dict(model.state_dict())
        first, again, reference = test(model), test(model), test(plain)
        assert first == pytest.approx(reference, abs=1e-6) and again == pytest.approx(reference, abs=1e-6)
        assert (len(model.feature_cache) == len(dm.dataset("test"))) == cached, name  # visual prompts: never cached


class _CheckingDraws(PromptSegmenter):
    """Records each training batch's (epoch, index, image sum) and whether its images are the
    dataset's seeded draws at the current epoch."""

    seen: list = []
    wrong = 0

    def training_step(self, batch, batch_idx):
        train = self.trainer.datamodule.dataset("train")
        drawn = torch.stack([train.item(i, self.current_epoch)["image"] for i in batch["index"].tolist()])
        type(self).wrong += not torch.equal(batch["image"].cpu(), drawn)
        type(self).seen += [(self.current_epoch, i, float(x.sum())) for i, x in zip(batch["index"].tolist(), batch["image"])]
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_seeded_draws_follow_the_epoch_in_loader_workers_and_when_resuming(backbone, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(epochs, ckpt_path=None):
        pl.seed_everything(0)
        dm = ShapeWorldSegmentationDataModule(str(tmp_path / "seg"), domain="clean", batch_size=16, num_workers=2, seed=3)
        model = _CheckingDraws(backbone, learner("coop"), reduce_dim=16, n_heads=2, lr_scheduler="constant")
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0, limit_train_batches=2, max_epochs=epochs,
                   callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                   default_root_dir=tmp_path).fit(model, datamodule=dm, ckpt_path=ckpt_path)

    fit(2)
    first = {(i, s) for e, i, s in _CheckingDraws.seen if e == 0}
    second = {(i, s) for e, i, s in _CheckingDraws.seen if e == 1}
    assert not first & second  # every epoch draws new crops (the seed does not freeze them)
    fit(3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))  # the workers start before the epoch is restored
    assert {e for e, _, _ in _CheckingDraws.seen} == {0, 1, 2}
    assert _CheckingDraws.wrong == 0
