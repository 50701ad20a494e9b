"""VPT: text side is exactly the hand-written classifier; a linear head on vision-only backbones."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from test_visual_prompts import TIMM_TINY
from vlprompt.backbones import TimmBackbone
from vlprompt.methods import PromptClassifier
from vlprompt.prompts import VPTPromptLearner, ZeroShotPrompt, load_prompt, save_prompt


def test_shallow_and_deep_shapes(backbone):
    assert VPTPromptLearner(backbone, ["a", "b"], n_tokens=5, depth=1).prompts.shape == (1, 5, backbone.vision_width)
    deep = VPTPromptLearner(backbone, ["a", "b"], n_tokens=5)
    assert deep.prompts.shape == (backbone.vision_layers, 5, backbone.vision_width)
    with pytest.raises(ValueError, match="between 1 and the image tower's 3 layers"):
        VPTPromptLearner(backbone, ["a", "b"], depth=4)


def test_text_head_is_the_zero_shot_classifier(backbone):
    names = ["cat", "dog"]
    vpt = VPTPromptLearner(backbone, names, templates="a photo of a {}.", depth=1)
    assert torch.equal(vpt.text_features(), ZeroShotPrompt(backbone, names).text_features())
    assert [n for n, _ in vpt.named_parameters()] == ["prompts"]


@pytest.fixture(scope="module")
def timm_backbone():
    torch.manual_seed(0)
    return TimmBackbone("vit_tiny_patch16_224", model_kwargs=TIMM_TINY)


def test_linear_head_on_a_vision_only_backbone_trains_saves_and_loads(timm_backbone, dassl_folder, tmp_path):
    from vlprompt.data import FewShotDataModule

    dm = FewShotDataModule(dassl_folder, shots=4, batch_size=8, num_workers=0, augment=False)
    dm.set_preprocess(timm_backbone.preprocess_cfg)
    model = PromptClassifier(
        timm_backbone, lambda b, c: VPTPromptLearner(b, c, n_tokens=2), dm.classnames,
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01), lr_scheduler="constant",
    )
    assert model.prompt_learner.head_type == "linear" and model.prompt_learner.text_features() is None
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    before = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    trainer.fit(model, datamodule=dm)
    after = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    assert after > before + 0.2
    save_prompt(model.prompt_learner, tmp_path / "vpt")
    loaded = load_prompt(tmp_path / "vpt", timm_backbone)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(images=x).logits, model.prompt_learner(images=x).logits)
    with pytest.raises(ValueError, match="linear head is tied to its 4 classes"):
        loaded.set_classnames(["a", "b"])
