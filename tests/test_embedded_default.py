"""The embedded default: it loads offline, and few-shot CoOp clearly beats zero-shot on the
held-out classes of its world (the claim the demo makes)."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.apps.fewshot import load_eval_config
from vlprompt.methods import PromptClassifier
from vlprompt.prompts import CoOpPromptLearner, ZeroShotPrompt
from vlprompt.resources import bundled_dir
from vlprompt.zoo import available_models, model_dir
from vlprompt.data import ShapeWorldDataModule
from vlprompt.data.world import CLASSNAMES


@pytest.fixture(scope="module")
def embedded():
    return OpenCLIPBackbone("zoo:shapeworld-clip-tiny")


def test_embedded_model_ships_and_loads_offline(embedded):
    assert "shapeworld-clip-tiny" in available_models()
    weights = model_dir("shapeworld-clip-tiny") / "open_clip_model.safetensors"
    assert weights.stat().st_size < 12 * 2**20  # a few MB
    assert embedded.is_causal and embedded.context_length == 32
    assert embedded.identity["fingerprint"] == OpenCLIPBackbone("zoo:shapeworld-clip-tiny").identity["fingerprint"]


def _trainer(**kwargs):
    return pl.Trainer(**{"accelerator": "cpu", "max_epochs": 20, "logger": False, "enable_checkpointing": False,
                         "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                         "limit_val_batches": 0, **kwargs})


@pytest.mark.slow
def test_coop_beats_zero_shot_on_held_out_classes(embedded, tmp_path):
    dm = ShapeWorldDataModule(str(tmp_path / "shapeworld"), shots=16, seed=1, num_workers=0, batch_size=32)
    assert dm.classnames == CLASSNAMES
    zero_shot = PromptClassifier(embedded, functools.partial(ZeroShotPrompt, templates="a photo of a {}."), dm.classnames)
    zs_acc = _trainer().test(zero_shot, datamodule=dm, verbose=False)[0]["test/acc"]
    pl.seed_everything(1)
    coop = PromptClassifier(
        embedded,
        functools.partial(CoOpPromptLearner, ctx_init="a photo of a"),
        dm.classnames,
        optimizer=functools.partial(torch.optim.SGD, lr=0.02, momentum=0.9),
    )
    trainer = _trainer()
    trainer.fit(coop, datamodule=dm)
    coop_acc = trainer.test(coop, datamodule=dm, verbose=False)[0]["test/acc"]
    negative = PromptClassifier(embedded, functools.partial(ZeroShotPrompt, templates="negative image of a {}"), dm.classnames)
    assert _trainer().test(negative, datamodule=dm, verbose=False)[0]["test/acc"] > 0.4  # the model knows negatives
    # The test images are negatives; "a photo of a" says nothing of that, a learned context can.
    assert coop_acc >= zs_acc + 0.30, f"CoOp {coop_acc:.3f} vs zero-shot {zs_acc:.3f}"


BASE_TO_NOVEL = load_eval_config(bundled_dir("configs") / "eval" / "shapeworld_base_to_novel.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(BASE_TO_NOVEL.methods) - {"coop"}))
def test_every_method_of_the_demo_learns_the_base_classes(method, embedded, tmp_path):
    dm = ShapeWorldDataModule(str(tmp_path / "shapeworld"), shots=16, seed=1, subset="base", num_workers=0, batch_size=32)
    zero_shot = PromptClassifier(embedded, functools.partial(ZeroShotPrompt, templates="a photo of a {}."), dm.classnames)
    zs_acc = _trainer().test(zero_shot, datamodule=dm, verbose=False)[0]["test/acc"]
    pl.seed_everything(1)
    model, trainer_args = BASE_TO_NOVEL.recipe(method).build(embedded, dm.classnames)
    trainer = _trainer(callbacks=trainer_args.get("callbacks"))  # e.g. PromptSRC's prompt aggregation
    trainer.fit(model, datamodule=dm)
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    assert acc >= zs_acc + 0.30, f"{method} {acc:.3f} vs zero-shot {zs_acc:.3f} on the base classes"


@pytest.mark.slow
def test_a_multitask_prompt_learns_every_task_and_carries_to_held_out_pairs(embedded, tmp_path):
    """MVLPT on the embedded world: one CoOp prompt tuned on the colour and texture tasks of the
    photographic negatives beats zero-shot on both, and, unchanged, on the held-out (colour,
    shape) pairs of the same domain, whose classes it never saw."""
    from vlprompt.data import MultiTaskDataModule
    from vlprompt.methods import MultiTaskPromptClassifier

    def task(name: str, shots: int) -> ShapeWorldDataModule:
        return ShapeWorldDataModule(str(tmp_path / name), task=name, domain="negative", shots=shots, augment=False,
                                    num_workers=0, batch_size=32, eval_batch_size=256, fewshot_dir=str(tmp_path / "draws" / name))

    pl.seed_everything(1)
    dm = MultiTaskDataModule({"colour": task("colour", 16), "texture": task("texture", 16)}, num_workers=0)
    zeroshot = MultiTaskPromptClassifier(embedded, functools.partial(ZeroShotPrompt, templates="a photo of a {}."), dm.classnames)
    _trainer().test(zeroshot, datamodule=dm, verbose=False)
    model = MultiTaskPromptClassifier(embedded, functools.partial(CoOpPromptLearner, n_ctx=4), dm.classnames,
                                      optimizer=lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9))
    _trainer(max_epochs=15).fit(model, datamodule=dm)
    _trainer().test(model, datamodule=dm, verbose=False)
    for name in ("colour", "texture"):
        assert model.task_results[name] > zeroshot.task_results[name] + 0.05, (name, model.task_results, zeroshot.task_results)
    pairs = task("pairs", -1)
    before = _trainer().test(PromptClassifier(embedded, functools.partial(ZeroShotPrompt, templates="a photo of a {}."),
                                              CLASSNAMES), datamodule=pairs, verbose=False)[0]["test/acc"]
    after = _trainer().test(model, datamodule=pairs, verbose=False)[0]["test/acc"]
    assert after > before + 0.2, (before, after)
