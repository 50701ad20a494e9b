"""The GPU tier (``pytest -m gpu``): every path that changes on a CUDA device, run there.

On a CUDA machine the models are random-weight ViT-B/16 at 224 px (ViT-L/14 for gradient
checkpointing, CLIPSeg rd64-refined at 352 px), trained under ``bf16-mixed`` and ``16-mixed``.
Without CUDA the tier is skipped, unless ``VLPROMPT_GPU_SMOKE=1``: then the same tests run on the
CPU with the tiny encoders of the rest of the suite (``bf16-mixed`` only: Lightning has no
``16-mixed`` on CPU), so that the tier cannot rot. ``benchmarks/gpu_report.py`` runs it
(``make gpu``; ``--smoke`` in CI) and collects the figures each test records (its largest
deviation from float32).

Mixed precision against float32 is compared on cosine similarities (logits over the logit scale):
autocast runs the matrix products in bfloat16 (8 significant bits, a relative rounding of 2^-9
per product) or float16 (11 bits, 2^-12) and keeps layer norms and softmax in float32. Over the
24 blocks of a ViT-B/16 the rounding of unit-norm features adds up to about 1e-2 (bf16) and 2e-3
(fp16); the tolerances below are 3x that.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CLIP, write_dassl_folder, write_model_dir
from test_prompt_contract import TINY_KWARGS
from vlprompt.backbones import Backbone, OpenCLIPBackbone
from vlprompt.data import FewShotDataModule
from vlprompt.methods import PromptClassifier, prompt_logits
from vlprompt.prompts import PROMPT_LEARNERS, CoOpPromptLearner, MaPLePromptLearner

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ACCELERATOR = "gpu" if CUDA else "cpu"
PRECISIONS = ("bf16-mixed", "16-mixed") if CUDA else ("bf16-mixed",)
AUTOCAST_DTYPE = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
#: Largest |cosine(mixed) - cosine(fp32)| allowed (see the module docstring).
COSINE_TOLERANCE = {"bf16-mixed": 3e-2, "16-mixed": 6e-3}
FAMILIES = sorted(n for n in PROMPT_LEARNERS if n != "zeroshot")
ROOT = Path(__file__).resolve().parents[1]


def _open_clip_config(name: str) -> dict:
    import open_clip

    return open_clip.get_model_config(name)


@dataclass(frozen=True)
class Sizes:
    """The models the tier runs: paper-sized on CUDA, tiny in the CPU smoke."""

    model_cfg: dict
    large_cfg: dict
    learner_kwargs: dict
    tpt_views: int


SIZES = (Sizes(_open_clip_config("ViT-B-16"), _open_clip_config("ViT-L-14"), {}, 64) if CUDA
         else Sizes(TINY_CLIP, TINY_CLIP, TINY_KWARGS, 8))


def _backbone(folder: Path, cfg: dict, seed: int = 0, **kwargs) -> OpenCLIPBackbone:
    torch.manual_seed(seed)
    return OpenCLIPBackbone(f"local-dir:{write_model_dir(folder, cfg)}", **kwargs).to(DEVICE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model"), SIZES.model_cfg)


@pytest.fixture(scope="module")
def shared_backbone(model_dir) -> OpenCLIPBackbone:
    torch.manual_seed(0)
    return OpenCLIPBackbone(f"local-dir:{model_dir}")


@pytest.fixture()
def backbone(shared_backbone) -> OpenCLIPBackbone:
    # Lightning moves a model (and so its backbone) back to the CPU when a fit or test ends.
    return shared_backbone.to(DEVICE)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return write_dassl_folder(tmp_path_factory.mktemp("colours"))


def _factory(name: str):
    return functools.partial(PROMPT_LEARNERS[name], **SIZES.learner_kwargs.get(name, {}))


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    options = dict(accelerator=ACCELERATOR, devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, default_root_dir=tmp_path)
    return pl.Trainer(**{**options, **kwargs})


class Watch(pl.Callback):
    """Training losses, and the parameters that had a gradient at an optimiser step (after the
    gradient scaler unscaled them)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.with_grad: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                self.with_grad.add(name)


def _learnable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _moved(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(p.detach(), before[n]) for n, p in module.named_parameters() if n in before)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _image_size(backbone: Backbone) -> int:
    size = backbone.preprocess_cfg["size"]
    return size if isinstance(size, int) else size[0]


def _check_against_fp32(run, precision: str, scale: float, record_property, tolerance: float | None = None) -> None:
    """``run()`` in float32 and under the precision's autocast: the largest deviation, over ``scale``."""
    with torch.no_grad():
        reference = run().float()
        with torch.autocast(DEVICE.type, dtype=AUTOCAST_DTYPE[precision]):
            mixed = run().float()
    assert torch.isfinite(mixed).all()
    error = float((mixed - reference).abs().max()) / scale
    record_property("max_deviation_from_fp32", error)
    assert error <= (tolerance or COSINE_TOLERANCE[precision]), error


# -- every learner family, trained and tested in mixed precision -----------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_learner_family_fits_and_tests_in_mixed_precision(name, precision, backbone, colours, tmp_path,
                                                                record_property):
    dm = FewShotDataModule(str(colours), shots=4, batch_size=4, num_workers=0, augment=False,
                           fewshot_dir=str(tmp_path / "fewshot"))
    torch.manual_seed(0)
    model = PromptClassifier(backbone, _factory(name), dm.classnames, lr_scheduler="constant",
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    start = _learnable(model.prompt_learner)
    watch = Watch()
    trainer = _trainer(tmp_path, precision=precision, max_epochs=2, callbacks=[watch])
    trainer.fit(model, datamodule=dm)
    assert len(watch.losses) == 8 and all(np.isfinite(watch.losses)), watch.losses
    assert watch.with_grad and all(n.startswith("prompt_learner.") for n in watch.with_grad), watch.with_grad
    assert all(p.grad is None for p in backbone.parameters())
    assert _moved(model.prompt_learner, start)
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert metrics["test/images"] == 24 and 0 <= metrics["test/acc"] <= 100
    model.to(DEVICE).eval()
    images = _images(4, _image_size(backbone))
    _check_against_fp32(lambda: model(images), precision, float(backbone.logit_scale), record_property)


# -- the image-feature cache and the augmented feature bank ------------------------------------------------
def test_feature_cache_and_feature_bank_on_the_device(backbone, colours, tmp_path):
    def fit(bank: str | None, precision: str = "32-true") -> PromptClassifier:
        dm = FewShotDataModule(str(colours), shots=-1, batch_size=8, num_workers=0, augment=True, augment_seed=0,
                               fewshot_dir=str(tmp_path / "fewshot"))
        pl.seed_everything(0, verbose=False)
        model = PromptClassifier(backbone, _factory("coop"), dm.classnames, feature_bank=bank)
        _trainer(tmp_path, max_epochs=2, precision=precision).fit(model, datamodule=dm)
        return model

    plain = fit(None)
    banked = fit(str(tmp_path / "bank"))
    assert banked.feature_bank.encoded == 32 * 2  # 32 training images, 2 epochs
    # The bank encodes views in other batch shapes than training does: the kernels may sum in
    # another order, a relative difference of about 1e-6 in float32, grown over 8 steps.
    ctx, expected = banked.prompt_learner.ctx.detach(), plain.prompt_learner.ctx.detach()
    torch.testing.assert_close(ctx, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4)
    mixed = fit(str(tmp_path / "bank"), "bf16-mixed")
    assert mixed.feature_bank.encoded == 0 and torch.isfinite(mixed.prompt_learner.ctx).all()  # stored already

    dm = FewShotDataModule(str(colours), shots=-1, batch_size=8, num_workers=0, fewshot_dir=str(tmp_path / "fewshot"))
    first = _trainer(tmp_path).test(plain, datamodule=dm, verbose=False)[0]
    assert len(plain.feature_cache) > 0
    cached = next(iter(next(iter(plain.feature_cache._features.values())).values()))
    assert cached.device.type == DEVICE.type
    assert _trainer(tmp_path).test(plain, datamodule=dm, verbose=False)[0] == first  # the same features, reused


# -- test-time tuning -------------------------------------------------------------------------------------------
def test_tpt_and_difftpt_on_the_device(backbone, colours, tmp_path):
    from vlprompt.methods import DiffTPT, TestTimePromptTuning
    from vlprompt.tta import SDEditGenerator

    dm = FewShotDataModule(str(colours), shots=-1, batch_size=2, eval_batch_size=2, num_workers=0,
                           fewshot_dir=str(tmp_path / "fewshot"))
    trainer = _trainer(tmp_path, precision="bf16-mixed", inference_mode=False, limit_predict_batches=3)
    tpt = TestTimePromptTuning(backbone, _factory("coop"), dm.classnames, n_views=SIZES.tpt_views)
    preds = trainer.predict(tpt, datamodule=dm)
    assert sum(len(p["prediction"]) for p in preds) == 6
    assert torch.isfinite(torch.cat([p["confidence"] for p in preds])).all() and tpt.unadapted_images == 0

    # DiffTPT: the embedded diffusion model generates its views on the same device.
    generator = SDEditGenerator("zoo:shapeworld-ddpm-tiny", n_views=4, steps=4, device=DEVICE.type)
    assert next(generator.unet.parameters()).device.type == DEVICE.type
    difftpt = DiffTPT(backbone, _factory("coop"), dm.classnames, generator=generator, n_views=8,
                      cache_dir=str(tmp_path / "views"))
    preds = trainer.predict(difftpt, datamodule=dm)
    assert sum(len(p["prediction"]) for p in preds) == 6 and difftpt.cache.misses == 6
    assert torch.isfinite(torch.cat([p["confidence"] for p in preds])).all() and difftpt.unadapted_images == 0


# -- segmentation --------------------------------------------------------------------------------------------
def _clipseg(folder: Path) -> Backbone:
    from vlprompt.backbones import HFCLIPBackbone

    if not CUDA:
        from test_hf_clipseg import tiny_clipseg

        return HFCLIPBackbone(str(tiny_clipseg(folder)), local_files_only=True).to(DEVICE)
    import transformers

    torch.manual_seed(0)  # CIDAS/clipseg-rd64-refined's layout, random weights
    config = transformers.CLIPSegConfig(vision_config={"patch_size": 16}, extract_layers=[3, 6, 9], reduce_dim=64,
                                        use_complex_transposed_convolution=True)
    model = transformers.CLIPSegForImageSegmentation(config)
    return HFCLIPBackbone.from_model(model, name="random CLIPSeg rd64-refined", image_size=352).to(DEVICE)


@pytest.mark.parametrize("vlsm", ["open_clip-decoder", "clipseg"])
def test_segmentation_fits_in_mixed_precision(vlsm, backbone, tmp_path, record_property):
    from vlprompt.data import ShapeWorldSegmentationDataModule
    from vlprompt.methods import PromptSegmenter

    seg_backbone = backbone if vlsm == "open_clip-decoder" else _clipseg(tmp_path / "clipseg")
    dm = ShapeWorldSegmentationDataModule(str(tmp_path / "seg"), domain="clean", batch_size=8, eval_batch_size=16,
                                          num_workers=0, augment=False)
    torch.manual_seed(0)
    extra = {"reduce_dim": 16, "n_heads": 2} if vlsm != "clipseg" and not CUDA else {}
    model = PromptSegmenter(seg_backbone, _factory("coop"), train_decoder=True, lr_scheduler="constant",
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **extra)
    start = _learnable(model.prompt_learner)
    watch = Watch()
    trainer = _trainer(tmp_path, precision="bf16-mixed", limit_train_batches=4, callbacks=[watch])
    trainer.fit(model, datamodule=dm)
    assert len(watch.losses) == 4 and all(np.isfinite(watch.losses)), watch.losses
    assert watch.with_grad and all(n.startswith(("prompt_learner.", "decoder.")) for n in watch.with_grad)
    assert any(n.startswith("prompt_learner.") for n in watch.with_grad) and _moved(model.prompt_learner, start)
    assert all(p.grad is None for p in seg_backbone.parameters())
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert 0 <= metrics["test/dice_dataset"] <= 1
    model.to(DEVICE).eval()
    size = _image_size(seg_backbone)
    images, prompts = _images(2, size), ["red star", "blue circle"]
    # mask probabilities, not logits: the decoder's logits are unbounded
    _check_against_fp32(lambda: torch.sigmoid(model(images, prompts).float()), "bf16-mixed", 1.0, record_property,
                        tolerance=5e-2)


# -- GRAM ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("second_order", [False, True], ids=["first-order", "second-order"])
def test_gram_meta_trains_on_the_device(second_order, backbone, tmp_path):
    from vlprompt.data import ImageTextPairsDataModule
    from vlprompt.data.world import write_caption_dataset
    from vlprompt.methods import GRAMMetaLearner

    pairs = write_caption_dataset(tmp_path / "pairs", 96, image_size=32)
    pl.seed_everything(0, verbose=False)
    model = GRAMMetaLearner(backbone, functools.partial(CoOpPromptLearner, n_ctx=4), n_way=3, k_shot=2, q_query=3,
                            n_domains=2, classes_per_domain=4, min_class_size=3, inner_steps=2, inner_lr=0.5,
                            second_order=second_order)
    dm = ImageTextPairsDataModule(str(pairs), episodes_per_epoch=4, episodes_per_batch=2, num_workers=0)
    start = _learnable(model.prompt_learner)
    watch = Watch()
    _trainer(tmp_path, precision="bf16-mixed", callbacks=[watch]).fit(model, datamodule=dm)
    assert len(watch.losses) == 2 and all(np.isfinite(watch.losses)), watch.losses
    assert watch.with_grad and all(n.startswith(("prompt_learner.", "regulator.")) for n in watch.with_grad)
    assert _moved(model.prompt_learner, start)
    saved = model.save_meta_prompt(tmp_path / "meta")
    assert (saved / "regulator.safetensors").is_file()


# -- DDP on one device, through the command line -------------------------------------------------------------------
def test_ddp_on_one_device_saves_once(model_dir, colours, tmp_path):
    backbone_yaml = tmp_path / "backbone.yaml"
    backbone_yaml.write_text(json.dumps({"model": {"backbone": {
        "class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": {"model_name": f"local-dir:{model_dir}"}}}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run(
        [sys.executable, "-m", "vlprompt.cli", "fit", "--config", str(ROOT / "configs/methods/coop.yaml"),
         "--config", str(backbone_yaml), "--data", "vlprompt.data.FewShotDataModule", f"--data.root={colours}",
         "--data.shots=4", "--data.num_workers=0", "--data.batch_size=4", f"--data.fewshot_dir={tmp_path / 'fs'}",
         f"--trainer.accelerator={ACCELERATOR}", "--trainer.devices=1", "--trainer.strategy=ddp",
         "--trainer.precision=bf16-mixed", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
         f"--trainer.default_root_dir={tmp_path / 'run'}", f"--save_prompt={tmp_path / 'prompt'}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert f"distributed_backend={'nccl' if CUDA else 'gloo'}" in output, output[-4000:]
    assert (tmp_path / "prompt" / "prompt.safetensors").is_file()
    assert output.count("learned prompt saved to") == 1
    checkpoints = sorted(p.name for p in (tmp_path / "run").rglob("*.ckpt"))
    assert checkpoints.count("last.ckpt") == 1 and len(checkpoints) == 2, checkpoints


# -- compile_towers --------------------------------------------------------------------------------------------
def test_compiled_towers_match_the_plain_ones_on_the_device(backbone):
    from test_compile import compiled_matches_plain

    compiled = OpenCLIPBackbone.from_model(copy.deepcopy(backbone.model), backbone.tokenizer, name=backbone.model_name,
                                           pretrained=backbone.pretrained, compile_towers=True).to(DEVICE)
    torch.manual_seed(0)
    learner = MaPLePromptLearner(backbone, ["cat", "red square", "dog"], **SIZES.learner_kwargs.get("maple", {}))
    # GPU kernels (cuBLAS, fused attention, Inductor's fusions) differ more in rounding than the CPU's
    compiled_matches_plain(learner.to(DEVICE), backbone, compiled, _images(2, _image_size(backbone)),
                           feature_atol=1e-4 if CUDA else 1e-5)


# -- gradient checkpointing on a large tower --------------------------------------------------------------------
def test_gradient_checkpointing_on_a_large_tower_with_deep_prompts(tmp_path, record_property):
    plain = _backbone(tmp_path / "large", SIZES.large_cfg)
    checkpointed = OpenCLIPBackbone.from_model(plain.model, plain.tokenizer, name=plain.model_name,
                                               grad_checkpointing=True)
    images = _images(4, _image_size(plain))
    results = {}
    for name, tower in (("plain", plain), ("checkpointed", checkpointed)):
        torch.manual_seed(1)
        learner = MaPLePromptLearner(tower, ["cat", "dog", "car"], **SIZES.learner_kwargs.get("maple", {})).to(DEVICE)
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        loss = F.cross_entropy(prompt_logits(learner(images=images), tower), torch.tensor([0, 1, 2, 0], device=DEVICE))
        loss.backward()
        peak = torch.cuda.max_memory_allocated() / 2**20 if CUDA else float("nan")
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in learner.named_parameters()}, peak)
    assert all(p.grad is None for p in plain.parameters())
    (loss, grads, peak), (loss_cp, grads_cp, peak_cp) = results["plain"], results["checkpointed"]
    torch.testing.assert_close(loss_cp, loss, atol=1e-5, rtol=1e-5)
    for key, grad in grads.items():
        torch.testing.assert_close(grads_cp[key], grad, atol=1e-5 * float(grad.abs().max()), rtol=1e-4)
    if CUDA:
        record_property("peak_mib_plain", peak)
        record_property("peak_mib_checkpointed", peak_cp)
        assert peak_cp < peak
