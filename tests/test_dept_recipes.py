"""The DePT recipes in configs/methods/: one Decoupled DePT recipe (Zhang et al., CVPR 2024) per
inner learner the reference ships, and Decomposed DePT's (Shi & Lipani, ICLR 2024) two learning
rates. Each recipe is read and built through vlprompt's config machinery (the runners'
MethodRecipe, jsonargparse with the CLI's types), and its values are compared with the reference's,
written out below with the reference file they come from."""

from __future__ import annotations

import math

import pytest
import torch

from vlprompt.apps.runner import MethodRecipe
from vlprompt.cli import main
from vlprompt.methods.optimization import prompt_optimization
from vlprompt.prompts import (
    CoCoOpPromptLearner,
    CoOpPromptLearner,
    DecoupledDePTPromptLearner,
    DePTPromptLearner,
    KgCoOpPromptLearner,
    MaPLePromptLearner,
)
from vlprompt.prompts.ivlp import resolve_depth
from vlprompt.resources import bundled_dir

METHODS = bundled_dir("configs") / "methods"
CLASSES = ["cat", "dog", "golden retriever", "car"]

# Koorye/DePT train.py (extend_cfg), shared by every learner: LINEAR_PROBE.WEIGHT 0.7,
# LINEAR_PROBE.TEST_TIME_FUSION True, OPTIM.LR_EXP 6.5 (the head's and FiLM's rate over the prompt's);
# every configs/trainers/ExtrasLinearProbe*/*.yaml: MAX_EPOCH 10, WARMUP_EPOCH 1, WARMUP_TYPE constant,
# WARMUP_CONS_LR 1e-5, LR_SCHEDULER cosine (Dassl's, per epoch); Dassl's SGD momentum 0.9, weight decay 5e-4.
DEPT_COMMON = {"weight": 0.7, "fuse": True, "head_lr_scale": 6.5, "max_epochs": 10, "warmup_epochs": 1,
               "warmup_lr": 1e-5, "momentum": 0.9, "weight_decay": 5e-4}

REFERENCE = {
    # Koorye/DePT configs/trainers/ExtrasLinearProbeCoOp/vit_b16_ep10_bs4_lr35.yaml (LR 0.0035) and
    # train.py's TRAINER.COOP defaults: N_CTX 16, CTX_INIT "" (random), CLASS_TOKEN_POSITION end.
    "decoupled_dept": {"learner": CoOpPromptLearner, "lr": 0.0035, "n_ctx": 16, "ctx_init": None},
    # Koorye/DePT configs/trainers/ExtrasLinearProbeCoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml:
    # LR 0.002, N_CTX 4, CTX_INIT "a photo of a" (batch 1: the data's setting).
    "decoupled_dept_cocoop": {"learner": CoCoOpPromptLearner, "lr": 0.002, "n_ctx": 4, "ctx_init": "a photo of a"},
    # Koorye/DePT configs/trainers/ExtrasLinearProbeKgCoOp/vit_b16_ep10_ctxv1_bs4_lr35.yaml:
    # LR 0.0035, N_CTX 4, CTX_INIT "a photo of a", W 2.0.
    "decoupled_dept_kgcoop": {"learner": KgCoOpPromptLearner, "lr": 0.0035, "n_ctx": 4, "ctx_init": "a photo of a",
                              "kg_weight": 2.0},
    # Koorye/DePT configs/trainers/ExtrasLinearProbeMaPLe/vit_b16_c2_ep10_batch4_2ctx.yaml:
    # LR 0.0035, N_CTX 2, CTX_INIT "a photo of a", PROMPT_DEPTH 9.
    "decoupled_dept_maple": {"learner": MaPLePromptLearner, "lr": 0.0035, "n_ctx": 2, "ctx_init": "a photo of a",
                             "depth": 9},
}


def _build(name: str, backbone):
    recipe = MethodRecipe([METHODS / f"{name}.yaml"])
    model, trainer_args = recipe.build(backbone, CLASSES)
    return model, trainer_args


def _initial_words(backbone, text: str) -> torch.Tensor:
    """Token embeddings of ``text``, one token per word (true of "a photo of a" in CLIP's BPE)."""
    ids = backbone.tokenize([text])[0, 1:1 + len(text.split())]  # after the start token
    with torch.no_grad():
        return backbone.token_embedding(ids)


def _groups_lr(model) -> list[float]:
    """The learning rate of each parameter group of the module's optimiser (before any schedule)."""
    groups = model.prompt_learner.optimizer_groups(model.trainable_parameters())
    optimizer = prompt_optimization(model.optimizer_factory, groups, lambda: None, lr_scheduler="constant")
    return [group["lr"] for group in optimizer.param_groups]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_decoupled_dept_recipe_is_the_reference_s(name, backbone):
    ref = {**DEPT_COMMON, **REFERENCE[name]}
    model, trainer_args = _build(name, backbone)
    learner = model.prompt_learner
    assert isinstance(learner, DecoupledDePTPromptLearner) and type(learner.inner) is ref["learner"]
    assert (learner.weight, learner.fuse, learner.head_lr_scale) == (ref["weight"], ref["fuse"], ref["head_lr_scale"])
    assert learner.inner.n_ctx == ref["n_ctx"] and learner.inner.ctx_init == ref["ctx_init"]
    if ref["ctx_init"]:  # the context starts from the words' embeddings
        torch.testing.assert_close(learner.inner.ctx.detach(), _initial_words(backbone, ref["ctx_init"])[:ref["n_ctx"]])
    if "kg_weight" in ref:
        assert learner.inner.weight == ref["kg_weight"]
    if "depth" in ref:  # null in the recipe: 9 on ViT-B/16's 12 layers, every layer of the tiny towers
        assert resolve_depth(None, 12, 12) == ref["depth"]
        assert learner.inner.depth == min(ref["depth"], backbone.text_layers, backbone.vision_layers)
    # Dassl's schedule, its warm-up, its dropped last batch and the reference's epochs.
    assert (model.lr_scheduler_name, model.warmup_epochs, model.warmup_lr) == ("dassl", ref["warmup_epochs"], ref["warmup_lr"])
    assert model.drop_last is True and trainer_args == {"max_epochs": ref["max_epochs"]}
    optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD)
    assert (optimizer.defaults["lr"], optimizer.defaults["momentum"], optimizer.defaults["weight_decay"]) == (
        ref["lr"], ref["momentum"], ref["weight_decay"])
    # The head and the channel adjustments at LR_EXP x the prompt's rate (trainers/optim.py's staged lr).
    assert _groups_lr(model) == pytest.approx([ref["lr"], ref["lr"] * ref["head_lr_scale"]])


@pytest.mark.parametrize("name", ["decoupled_dept_cocoop", "decoupled_dept_kgcoop", "decoupled_dept_maple"])
def test_decoupled_dept_recipes_fit_through_the_cli(name, tmp_path, tiny_model_dir, dassl_folder):
    import yaml

    backbone_yaml = tmp_path / "backbone.yaml"
    backbone_yaml.write_text(yaml.safe_dump({"model": {"backbone": {
        "class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": {"model_name": f"local-dir:{tiny_model_dir}"}}}}))
    target = tmp_path / "prompt"
    main(["fit", "--config", str(METHODS / f"{name}.yaml"), "--config", str(backbone_yaml), "--data",
          "vlprompt.data.FewShotDataModule", f"--data.root={dassl_folder}", "--data.shots=2", "--data.num_workers=0",
          "--data.batch_size=4", "--data.subset=base", "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
          f"--trainer.default_root_dir={tmp_path}", f"--save_prompt={target}"])
    assert (target / "prompt.safetensors").is_file()
    assert yaml.safe_load((target / "config.json").read_text())["method"] == "decoupled_dept"


def test_decomposed_dept_recipe_sets_both_learning_rates(backbone):
    # ZhengxiangShi/DePT has no CLIP values (README.md, train.py: T5/LLaMA, AdamW, prompt 3e-1/4e-1,
    # low-rank pair 5e-4 to 5e-3, lora_alpha 8); configs/methods/dept.yaml explains the CLIP values:
    # CoOp's SGD 0.002 for the soft prompt (KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16.yaml) and
    # the same nominal rate for the low-rank pair, whose update is scaled by alpha/sqrt(rank)*RMS.
    model, trainer_args = _build("dept", backbone)
    learner = model.prompt_learner
    assert isinstance(learner, DePTPromptLearner) and learner.n_ctx == 8 and learner.lowrank_lr == 0.002
    assert learner.scale > 0 and torch.count_nonzero(learner.lora_B) == 0  # alpha 8 recorded in the scale; B at zero
    assert (model.lr_scheduler_name, model.warmup_epochs, model.warmup_lr, model.drop_last) == ("dassl", 1, 1e-5, True)
    optimizer = prompt_optimization(model.optimizer_factory, learner.optimizer_groups(model.trainable_parameters()),
                                    lambda: None, lr_scheduler="constant")
    lowrank = {id(learner.lora_A), id(learner.lora_B)}
    rates = {("lowrank" if all(id(p) in lowrank for p in g["params"]) else "prompt"): g["lr"] for g in optimizer.param_groups}
    assert rates == {"prompt": 0.002, "lowrank": 0.002} and len(optimizer.param_groups) == 2
    assert isinstance(optimizer, torch.optim.SGD) and trainer_args == {}


def test_decoupled_dept_recipe_runs_dassl_s_epochs_for_prompt_and_head(backbone):
    """Koorye/DePT trainers/elp_coop.py builds Dassl's scheduler over its two groups (trainers/optim.py):
    ConstantWarmupScheduler holds every group at WARMUP_CONS_LR = 1e-5 for WARMUP_EPOCH = 1, then
    CosineAnnealingLR(T_max=MAX_EPOCH = 10) steps once per epoch from each group's own rate."""
    from types import SimpleNamespace

    model, trainer_args = _build("decoupled_dept", backbone)
    epochs = trainer_args["max_epochs"]
    groups = model.prompt_learner.optimizer_groups(model.trainable_parameters())
    built = prompt_optimization(model.optimizer_factory, groups, lambda: SimpleNamespace(max_epochs=epochs),
                                lr_scheduler=model.lr_scheduler_name, warmup_epochs=model.warmup_epochs,
                                warmup_lr=model.warmup_lr)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert built["lr_scheduler"]["interval"] == "epoch"
    rates = []
    for epoch in range(epochs):
        want = [1e-5] * 2 if epoch < 1 else [base * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2
                                             for base in (0.0035, 0.0035 * 6.5)]
        rates.append([g["lr"] for g in optimizer.param_groups])
        assert rates[-1] == pytest.approx(want, rel=1e-12), epoch
        optimizer.step()
        scheduler.step()
    assert rates[-1][0] / 0.0035 == pytest.approx(0.0955, abs=1e-4)  # the last epoch still at 9.5% of the rate
