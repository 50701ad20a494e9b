"""DiffTPT: diffusion view generators on tiny diffusers components, the view cache, the cosine
filter and the Lightning loop."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from vlprompt.data import FewShotDataModule
from vlprompt.methods import DiffTPT
from vlprompt.tta import ImageVariationGenerator, SDEditGenerator, ViewCache, confident_views, similar_views


# -- tiny diffusers components, built the way diffusers' own tests build dummy parts ------------
def tiny_unet(seed: int = 0, sample_size: int = 16, channels: int = 3):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )


def tiny_scheduler(**overrides):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=100, **overrides)


def tiny_sdedit(**kwargs) -> SDEditGenerator:
    kwargs.setdefault("n_views", 3)
    return SDEditGenerator(kwargs.pop("unet", None) or tiny_unet(), scheduler=kwargs.pop("scheduler", None) or tiny_scheduler(),
                           steps=4, device="cpu", **kwargs)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )


def tiny_image_variation_pipeline():
    from diffusers import PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    )
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2,
        image_size=16, patch_size=4,
    ))
    return StableDiffusionImageVariationPipeline(
        vae=tiny_vae(), image_encoder=encoder, unet=unet, scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None, feature_extractor=CLIPImageProcessor(crop_size=16, size=16),
        requires_safety_checker=False,
    )


def _image(seed: int, size=(20, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def _pixels(images):
    return [np.asarray(v) for v in images]


# -- generators -----------------------------------------------------------------------------------
def test_sdedit_views_are_batched_seeded_per_view_and_independent_of_the_batch():
    gen = tiny_sdedit(batch_size=4)
    a, b = _image(0), _image(1)
    alone = gen.generate([a])[0]
    together = gen.generate([b, a])
    assert len(alone) == 3 and len(together) == 2 and all(len(v) == 3 for v in together)
    assert all(v.size == (16, 16) and v.mode == "RGB" for v in alone)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(alone), _pixels(together[1])))
    assert not np.array_equal(np.asarray(alone[0]), np.asarray(alone[1]))  # views differ


def test_sdedit_strength_zero_returns_the_image_and_full_strength_a_new_sample():
    image = _image(0, size=(16, 16))
    same = tiny_sdedit(strength=0.0, n_views=1).generate([image])[0][0]
    assert np.array_equal(np.asarray(same), np.asarray(image))
    new = tiny_sdedit(strength=1.0, n_views=1).generate([image])[0][0]
    assert not np.array_equal(np.asarray(new), np.asarray(image))
    with pytest.raises(ValueError, match="strength"):
        tiny_sdedit(strength=1.5)


def test_sdedit_in_a_vae_latent_space():
    gen = tiny_sdedit(unet=tiny_unet(sample_size=8, channels=4), vae=tiny_vae(), n_views=2)
    assert gen.size == 16  # the UNet's 8 latents times the VAE's factor 2
    views = gen.generate([_image(3)])[0]
    assert [v.size for v in views] == [(16, 16), (16, 16)]


def test_sdedit_refuses_a_conditional_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, norm_num_groups=4,
                                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                cross_attention_dim=8, attention_head_dim=4)
    with pytest.raises(TypeError, match="UNet2DModel"):
        SDEditGenerator(unet, scheduler=tiny_scheduler(), device="cpu")


def test_sdedit_loads_a_saved_pipeline_folder(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "ddpm")
    gen = SDEditGenerator(str(tmp_path / "ddpm"), n_views=2, steps=4, device="cpu")
    assert type(gen.scheduler).__name__ == "DDIMScheduler"  # deterministic by default
    assert [v.size for v in gen.generate([_image(0)])[0]] == [(16, 16), (16, 16)]


def test_image_variation_pipeline_generates_batched_views():
    gen = ImageVariationGenerator(tiny_image_variation_pipeline(), n_views=2, steps=2, size=16, batch_size=3, device="cpu")
    a, b = _image(0), _image(1)
    alone = gen.generate([a])[0]
    together = gen.generate([b, a])
    assert [v.size for v in alone] == [(16, 16), (16, 16)]
    assert all(np.allclose(x, y, atol=2) for x, y in zip(_pixels(alone), _pixels(together[1])))


# -- cache --------------------------------------------------------------------------------------
class CountingSDEdit(SDEditGenerator):
    calls = 0

    def _generate(self, images, seeds):
        CountingSDEdit.calls += len(images)
        return super()._generate(images, seeds)


def test_cache_reads_back_what_it_generated_without_generating_again(tmp_path):
    gen = CountingSDEdit(tiny_unet(), scheduler=tiny_scheduler(), n_views=3, steps=4, device="cpu")
    CountingSDEdit.calls = 0
    cache = ViewCache(gen, tmp_path / "cache")
    a, b = _image(0), _image(1)
    first = cache.views([a, b])
    assert CountingSDEdit.calls == 6 and (cache.hits, cache.misses) == (0, 2)
    again = ViewCache(gen, tmp_path / "cache").views([b.copy(), a])  # a fresh cache object, same folder
    assert CountingSDEdit.calls == 6  # nothing regenerated
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(again[1]), _pixels(first[0])))
    assert len(list((tmp_path / "cache").glob("*/*/settings.json"))) == 2


def test_cache_key_changes_with_every_generator_setting_and_the_image():
    base = dict(n_views=3, strength=0.5, seed=0, size=None)
    image = _image(0)
    key = ViewCache(tiny_sdedit(**base)).key(image)
    assert ViewCache(tiny_sdedit(**base)).key(image.copy()) == key  # same pixels, same settings
    variants = [
        tiny_sdedit(**base | {"n_views": 4}),
        tiny_sdedit(**base | {"strength": 0.6}),
        tiny_sdedit(**base | {"seed": 1}),
        tiny_sdedit(**base | {"size": 24}),
        tiny_sdedit(**base, unet=tiny_unet(seed=1)),  # other weights
        tiny_sdedit(**base, scheduler=tiny_scheduler(beta_schedule="squaredcos_cap_v2")),
        SDEditGenerator(tiny_unet(), scheduler=tiny_scheduler(), steps=8, device="cpu", **base),
        SDEditGenerator(tiny_unet(), scheduler=tiny_scheduler(), steps=4, device="cpu", dtype="bfloat16", **base),
    ]
    keys = [ViewCache(g).key(image) for g in variants] + [ViewCache(tiny_sdedit(**base)).key(_image(1))]
    assert key not in keys and len(set(keys)) == len(keys)


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    cache = ViewCache(tiny_sdedit(), tmp_path / "cache")
    views = cache.generator.generate([_image(0)])[0]
    calls = {"n": 0}
    original_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        cache.save(_image(0), views)
    monkeypatch.undo()
    assert cache.load(_image(0)) is None
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


# -- filter and selection ---------------------------------------------------------------------
def test_cosine_filter_keeps_the_views_most_similar_to_the_original():
    original = torch.tensor([1.0, 0.0])
    angles = torch.tensor([0.0, 0.1, 2.0, 0.3, 3.0, 0.2])  # rows 1.. are candidates
    embeddings = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * torch.arange(1, 7)[:, None]
    embeddings[0] = original
    kept = similar_views(embeddings, torch.arange(1, 6), 0.6)
    assert kept.tolist() == [1, 5, 3]  # the three smallest angles, whatever the norms
    assert similar_views(embeddings, torch.arange(1, 6), 0.01).tolist() == [1]


def _difftpt(backbone, **kwargs):
    kwargs.setdefault("generator", tiny_sdedit(n_views=4))
    return DiffTPT(backbone, classnames=["red", "green", "blue"], n_views=4, cache_dir=None, **kwargs)


@pytest.mark.parametrize("scope", ["generated", "all"])
def test_difftpt_selects_confident_views_among_the_original_conventional_and_similar_generated(backbone, scope):
    model = _difftpt(backbone, filter_on="logits", filter_ratio=0.5, selection_ratio=0.5, filter_scope=scope)
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) * 3
    kept = model.select_views(torch.zeros(8, 3, 32, 32), None, logits)
    first = 4 if scope == "generated" else 1
    similar = similar_views(logits, torch.arange(first, 8), 0.5)
    candidates = torch.cat([torch.arange(first), similar])
    assert kept.tolist() == candidates[confident_views(logits[candidates], 0.5)].tolist()
    assert len(kept) == len(candidates) // 2


def test_difftpt_filter_on_features_uses_frozen_image_features(backbone):
    model = _difftpt(backbone, filter_ratio=0.25, selection_ratio=1.0)
    views = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = backbone.encode_image(views)
    kept = model.select_views(views, None, torch.zeros(8, 3))
    assert sorted(kept.tolist()) == sorted([0, 1, 2, 3, similar_views(features, torch.arange(4, 8), 0.25).item()])


def test_difftpt_runs_in_lightning_and_reuses_its_cache(backbone, image_folder, tmp_path):
    gen = CountingSDEdit(tiny_unet(), scheduler=tiny_scheduler(), n_views=3, steps=4, device="cpu")
    CountingSDEdit.calls = 0
    dm = FewShotDataModule(str(image_folder), shots=-1, batch_size=2, eval_batch_size=2, num_workers=0)
    model = DiffTPT(backbone, classnames=dm.classnames, generator=gen, n_views=4, steps=1,
                    cache_dir=str(tmp_path / "views"))
    trainer = pl.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    preds = trainer.predict(model, datamodule=dm)
    n = len(dm.datasets["test"])
    assert sum(len(p["prediction"]) for p in preds) == n
    assert CountingSDEdit.calls == 3 * n and model.cache.misses == n
    again = trainer.predict(model, datamodule=dm)
    assert CountingSDEdit.calls == 3 * n  # the second run reads every view from disk
    assert torch.equal(torch.cat([p["prediction"] for p in again]), torch.cat([p["prediction"] for p in preds]))


def test_sdedit_with_a_multistep_solver():
    from diffusers import DPMSolverMultistepScheduler

    gen = tiny_sdedit(scheduler=DPMSolverMultistepScheduler(num_train_timesteps=100), n_views=2)
    views = gen.generate([_image(0)])[0]
    assert len(views) == 2 and views[0].size == (16, 16)
