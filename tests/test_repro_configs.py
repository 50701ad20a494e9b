"""The reproduction configs in configs/repro/: one per paper protocol. Each parses and validates with
the runner it declares (read_config / typed_config), names the reference file(s) its
hyper-parameters come from, builds every method it lists, and its settings (shots, seeds, backbone,
batch size, epochs, learning rate, prompt lengths) are the reference's, written out below with the
file they come from."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import TINY_CLIP, make_backbone
from vlprompt.apps.fewshot import load_eval_config
from vlprompt.apps.runner import declared_runner, read_yaml
from vlprompt.data.catalog import list_datasets
from vlprompt.resources import bundled_dir

REPRO = bundled_dir("configs") / "repro"
CONFIGS = sorted(REPRO.glob("*.yaml"))
#: The reference repositories a repro config may cite.
REPOSITORIES = {"KaiyangZhou/CoOp", "muzairkhattak/multimodal-prompt-learning", "muzairkhattak/PromptSRC",
                "htyao89/KgCoOp", "Koorye/DePT", "sIncerass/MVLPT", "naamiinepal/tunevlseg"}
REFERENCE_LINE = re.compile(r"^# Reference: (?P<repo>[\w.-]+/[\w.-]+) (?P<path>[\w.+/-]+\.(?:yaml|sh|py|md))\b", re.M)

ELEVEN = ["caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "imagenet", "oxford_flowers", "oxford_pets",
          "stanford_cars", "sun397", "ucf101"]
#: Cross-dataset targets (CoCoOp/MaPLe: the ten datasets besides ImageNet) and domain shifts of ImageNet.
XD = sorted(set(ELEVEN) - {"imagenet"})
DG = ["imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2"]

# (config, method) -> the reference's settings: data batch size, epochs, SGD learning rate, and
# the prompt learner's arguments that the protocol fixes.
EXPECTED = {
    # KaiyangZhou/CoOp configs/trainers/CoOp/rn50.yaml: batch 32, lr 0.002, 200 epochs (8/16 shots);
    # scripts/coop/main.sh with M=16, end, CSC False.
    ("coop_fewshot", "coop"): dict(batch=32, epochs=200, lr=0.002, n_ctx=16, ctx_init=None),
    # KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16_ctxv1.yaml: batch 32, lr 0.002, 200 epochs, "a photo of a".
    ("b2n_coop", "coop"): dict(batch=32, epochs=200, lr=0.002, n_ctx=4, ctx_init="a photo of a"),
    # KaiyangZhou/CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml: batch 1, lr 0.002, 10 epochs.
    ("b2n_cocoop", "cocoop"): dict(batch=1, epochs=10, lr=0.002, n_ctx=4, ctx_init="a photo of a"),
    # htyao89/KgCoOp KgCoOp/configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml (batch 128, lr 0.002, 100
    # epochs) and scripts/run.sh (W 8.0).
    ("b2n_kgcoop", "kgcoop"): dict(batch=128, epochs=100, lr=0.002, n_ctx=4, ctx_init="a photo of a", weight=8.0),
    # muzairkhattak/multimodal-prompt-learning configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml.
    ("b2n_maple", "maple"): dict(batch=4, epochs=5, lr=0.0035, n_ctx=2, depth=9),
    # muzairkhattak/PromptSRC configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml.
    ("b2n_promptsrc", "promptsrc"): dict(batch=4, epochs=20, lr=0.0025, n_ctx=4, text_depth=9, vision_depth=9,
                                         gpa=(15, 1)),
    # Koorye/DePT configs/trainers/{CoOp,KgCoOp,MaPLe}/*.yaml and ExtrasLinearProbe*/*.yaml: batch 4,
    # lr 0.0035, 10 epochs; KgCoOp W 2.0.
    ("b2n_dept", "coop"): dict(batch=4, epochs=10, lr=0.0035, n_ctx=16, ctx_init=None),
    ("b2n_dept", "coop_dept"): dict(batch=4, epochs=10, lr=0.0035),
    ("b2n_dept", "kgcoop"): dict(batch=4, epochs=10, lr=0.0035, n_ctx=4, weight=2.0),
    ("b2n_dept", "kgcoop_dept"): dict(batch=4, epochs=10, lr=0.0035),
    ("b2n_dept", "maple"): dict(batch=4, epochs=10, lr=0.0035, n_ctx=2, depth=9),
    ("b2n_dept", "maple_dept"): dict(batch=4, epochs=10, lr=0.0035),
    # Koorye/DePT configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml: batch 1, lr 0.002, 10 epochs.
    ("b2n_dept_cocoop", "cocoop"): dict(batch=1, epochs=10, lr=0.002, n_ctx=4),
    ("b2n_dept_cocoop", "cocoop_dept"): dict(batch=1, epochs=10, lr=0.002),
    # KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml: batch 32, lr 0.002, 50 epochs.
    ("xd_coop", "coop"): dict(batch=32, epochs=50, lr=0.002, n_ctx=4, ctx_init="a photo of a"),
    ("dg_coop", "coop"): dict(batch=32, epochs=50, lr=0.002, n_ctx=4, ctx_init="a photo of a"),
    # KaiyangZhou/CoOp scripts/cocoop/xd_train.sh: vit_b16_c4_ep10_batch1_ctxv1 on ImageNet.
    ("xd_cocoop", "cocoop"): dict(batch=1, epochs=10, lr=0.002, n_ctx=4),
    ("dg_cocoop", "cocoop"): dict(batch=1, epochs=10, lr=0.002, n_ctx=4),
    # muzairkhattak/multimodal-prompt-learning configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml.
    ("xd_maple_promptsrc", "maple"): dict(batch=4, epochs=2, lr=0.0026, n_ctx=2, depth=3),
    ("dg_maple_promptsrc", "maple"): dict(batch=4, epochs=2, lr=0.0026, n_ctx=2, depth=3),
    # muzairkhattak/PromptSRC configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml.
    ("xd_maple_promptsrc", "promptsrc"): dict(batch=4, epochs=20, lr=0.0025, n_ctx=4, text_depth=3, vision_depth=3,
                                              gpa=(6, 10)),
    ("dg_maple_promptsrc", "promptsrc"): dict(batch=4, epochs=20, lr=0.0025, n_ctx=4, text_depth=3, vision_depth=3,
                                              gpa=(6, 10)),
}


@pytest.fixture(scope="module")
def deep_backbone(tmp_path_factory):
    """A tiny CLIP with ViT-B/16's 12 layers per tower, so depth-9 prompts build as in the papers."""
    cfg = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "layers": 12},
           "text_cfg": {**TINY_CLIP["text_cfg"], "layers": 12}}
    return make_backbone(tmp_path_factory.mktemp("deep_clip"), cfg)


def test_the_table_covers_every_protocol():
    names = {p.stem for p in CONFIGS}
    assert {c for c, _ in EXPECTED} == names
    for config in names:
        assert set(load_eval_config(REPRO / f"{config}.yaml").methods) == {m for c, m in EXPECTED if c == config}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_a_repro_config_names_its_reference_files(path):
    refs = REFERENCE_LINE.findall(path.read_text())
    assert refs, f"{path.name}: no '# Reference: owner/repo path' line"
    assert {repo for repo, _ in refs} <= REPOSITORIES


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_a_repro_config_validates_with_its_runner_and_builds_its_methods(path, deep_backbone):
    assert declared_runner(read_yaml(path), path) == "fewshot"
    cfg = load_eval_config(path)  # typed by jsonargparse; unknown keys are errors
    assert cfg.seeds == [1, 2, 3] and cfg.zeroshot == {"templates": "dataset"}
    backbone = cfg.backbone["init_args"]
    assert backbone["pretrained"] == "openai"
    assert backbone["model_name"] == ("RN50" if path.stem == "coop_fewshot" else "ViT-B-16")  # CoOp's figures: RN50
    datasets = [cfg.data["init_args"]["dataset"], *(t["init_args"]["dataset"] for t in (cfg.transfer.targets.values()
                                                                                         if cfg.transfer else []))]
    assert set(datasets) <= set(list_datasets())
    if path.stem.startswith("b2n_"):  # 16 shots of the base classes, tested on base and novel
        assert cfg.base_to_novel == {"shots": 16} and cfg.shots == [] and cfg.transfer is None
    elif path.stem.startswith(("xd_", "dg_")):  # 16 shots of all ImageNet classes, then the targets
        assert cfg.data["init_args"]["dataset"] == "imagenet" and cfg.base_to_novel is None and cfg.shots == []
        assert cfg.transfer.shots == 16 and cfg.transfer.subset == "all"
        assert sorted(cfg.transfer.targets) == (XD if path.stem.startswith("xd_") else DG)
    else:  # CoOp's few-shot curves: the 200-epoch shot counts here, 1/2/4 by --shots and --max-epochs
        assert cfg.shots == [8, 16] and cfg.base_to_novel is None and cfg.transfer is None
    for method in cfg.methods:
        _check_method(path.stem, method, cfg, deep_backbone)


def _check_method(config, method, cfg, backbone):
    want = EXPECTED[(config, method)]
    model, trainer_args = cfg.recipe(method).build(backbone, ["cat", "dog", "car"])
    assert cfg.data["init_args"]["batch_size"] == want["batch"], (config, method)
    assert trainer_args["max_epochs"] == want["epochs"], (config, method)
    optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == want["lr"], (config, method)
    assert (model.lr_scheduler_name, model.warmup_epochs, model.warmup_lr, model.drop_last) == ("dassl", 1, 1e-5, True)
    learner = model.prompt_learner
    learner = getattr(learner, "inner", learner)  # Decoupled DePT: the learner inside
    got = {key: getattr(learner, key, None) for key in ("n_ctx", "ctx_init", "depth", "weight")}
    if hasattr(learner, "vision_prompts"):  # IVLP/PromptSRC keep one prompt per deep layer
        got["text_depth"], got["vision_depth"] = len(learner.deep_text_prompts()) + 1, len(learner.vision_prompts)
    for key in set(want) & set(got):
        assert got[key] == want[key], (config, method, key)
    if "gpa" in want:  # PromptSRC's Gaussian prompt aggregation (GPA_MEAN, GPA_STD)
        [gpa] = [c for c in trainer_args["callbacks"] if type(c).__name__ == "GaussianPromptAggregation"]
        assert (gpa.mean, gpa.std) == want["gpa"], (config, method)
