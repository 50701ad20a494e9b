"""Multitask prompt tuning (MVLPT): the union label space, task sampling, the task-restricted
loss, per-task evaluation, and k shots that include the validation images."""

from __future__ import annotations

import functools
import math
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import RandomSampler

from vlprompt.data import FewShotDataModule, MultiTaskDataModule, Task, TaskBatchSampler
from vlprompt.methods import MultiTaskPromptClassifier, PromptClassifier, task_scores
from vlprompt.prompts import PROMPT_LEARNERS, CoOpPromptLearner

COOP = functools.partial(CoOpPromptLearner, n_ctx=4)


def adam(params):
    return torch.optim.Adam(params, lr=0.05)


def trainer(tmp_path, **kw):
    defaults = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kw})


def fewshot(root, **kw):
    return FewShotDataModule(str(root), **{"shots": 4, "num_workers": 0, "batch_size": 8, "augment": False, **kw})


@pytest.fixture()
def two_tasks(dassl_folder, image_folder):
    """Task ``base``: 2 colour classes (Dassl split); task ``all``: the same 4 colours from another
    folder, so two class names are shared by both tasks and must stay separate classes."""
    return {"base": fewshot(dassl_folder, subset="base"), "all": fewshot(image_folder, shots=3)}


def multitask(tasks, **kw):
    return MultiTaskDataModule(tasks, **{"num_workers": 0, "batch_size": 4, **kw})


def test_labels_are_offset_into_one_space_and_carry_their_task(backbone, two_tasks):
    dm = multitask(two_tasks)
    base, every = two_tasks["base"].classnames, two_tasks["all"].classnames
    assert dm.classnames == base + every and len(dm.classnames) == 6  # shared names stay two classes
    assert [(t.name, t.offset, t.num_classes) for t in dm.tasks] == [("base", 0, 2), ("all", 2, 4)]
    dm.set_preprocess(backbone.preprocess_cfg)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    assert len(dataset) == 2 * 4 + 4 * 3
    for i in range(len(dataset)):
        task, local = dataset.locate(i)
        item, original = dataset[i], dataset.parts[task][local]
        assert item["task"] == task and item["index"] == i
        assert item["label"] - dm.tasks[task].offset == original["label"]
        assert dm.classnames[item["label"]] == two_tasks[dm.tasks[task].name].classnames[original["label"]]
        assert torch.equal(item["image"], original["image"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"image", "label", "task", "index"}


@pytest.mark.parametrize("mode", ["proportional", "round_robin"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_task_batches_visit_every_sample_once(mode, drop_last):
    task_of = [0] * 30 + [1] * 10 + [2] * 5
    torch.manual_seed(0)
    sampler = TaskBatchSampler(RandomSampler(range(len(task_of))), 8, drop_last, task_of=task_of, mode=mode)
    batches = list(sampler)
    assert len(batches) == len(sampler) == (len(task_of) // 8 if drop_last else math.ceil(len(task_of) / 8))
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) and (drop_last or sorted(seen) == list(range(len(task_of))))
    made_up = [Counter(task_of[i] for i in b) for b in batches if len(b) == 8]
    if mode == "proportional":  # 30:10:5 of 8 is 5.3 : 1.8 : 0.9
        for counts in made_up:
            assert abs(counts[0] - 5.33) <= 1.5 and abs(counts[1] - 1.78) <= 1.5 and counts[2] <= 2
    else:  # one task a batch, except where a task runs out mid-batch
        assert sum(len(c) == 1 for c in made_up) >= len(made_up) - 2
        assert [c.most_common(1)[0][0] for c in made_up[:3]] == [0, 1, 2]


def test_training_batches_follow_the_sampling(backbone, two_tasks):
    for sampling in ("mixed", "proportional", "round_robin"):
        dm = multitask(two_tasks, sampling=sampling)
        dm.set_preprocess(backbone.preprocess_cfg)
        loader = dm.train_dataloader()
        indices = sorted(int(i) for batch in loader for i in batch["index"])
        assert indices == list(range(len(dm.datasets["train"])))
        if sampling == "round_robin":
            assert all(len(set(batch["task"].tolist())) <= 2 for batch in loader)


def test_task_loss_gives_no_probability_to_other_tasks(backbone, two_tasks):
    dm = multitask(two_tasks)
    model = MultiTaskPromptClassifier(backbone, COOP, dm.classnames, loss="task")
    model.set_tasks(dm.tasks)
    logits = torch.randn(3, 6)
    task_ids = torch.tensor([0, 1, 1])
    probs = model.own_task_logits(logits, task_ids).softmax(-1)
    assert torch.all(probs[0, 2:] == 0) and torch.all(probs[1:, :2] == 0)
    assert torch.allclose(probs[0, :2], logits[0, :2].softmax(-1)) and torch.allclose(probs[1, 2:], logits[1, 2:].softmax(-1))
    # The loss is the cross-entropy within the sample's own task.
    labels = torch.tensor([1, 3, 5])
    within = torch.stack([torch.nn.functional.cross_entropy(logits[0:1, :2], labels[0:1]),
                          torch.nn.functional.cross_entropy(logits[1:, 2:], labels[1:] - 2) * 2]).sum() / 3
    assert torch.allclose(torch.nn.functional.cross_entropy(model.own_task_logits(logits, task_ids), labels), within)


@pytest.mark.parametrize("loss", ["union", "task"])
def test_fit_lowers_the_loss_and_each_task_scores_as_if_alone(loss, backbone, two_tasks, tmp_path):
    pl.seed_everything(0)
    dm = multitask(two_tasks, sampling="proportional")
    model = MultiTaskPromptClassifier(backbone, COOP, dm.classnames, loss=loss, optimizer=adam, lr_scheduler="constant")
    before = trainer(tmp_path).test(model, datamodule=dm, verbose=False)[0]
    trainer(tmp_path, max_epochs=8).fit(model, datamodule=dm)
    after = trainer(tmp_path).test(model, datamodule=dm, verbose=False)[0]
    assert after["test/acc"] > before["test/acc"]
    assert set(model.task_results) == {"base", "all"}
    assert after["test/acc"] == pytest.approx(sum(model.task_results.values()) / 2)
    # Each task evaluated alone with the same prompt gives the same score.
    for name, task_dm in two_tasks.items():
        alone = PromptClassifier(backbone, COOP, task_dm.classnames)
        alone.prompt_learner.load_state_dict(model.prompt_learner.state_dict())
        acc = trainer(tmp_path).test(alone, datamodule=task_dm, verbose=False)[0]["test/acc"]
        assert acc == pytest.approx(model.task_results[name], abs=1e-6), name


def test_the_model_follows_target_tasks_after_source_training(backbone, two_tasks, dassl_folder, tmp_path):
    dm = multitask(two_tasks)
    model = MultiTaskPromptClassifier(backbone, COOP, dm.classnames)
    target = multitask({"novel": fewshot(dassl_folder, subset="novel")})
    trainer(tmp_path).test(model, datamodule=target, verbose=False)
    assert model.prompt_learner.classnames == target.classnames and list(model.task_results) == ["novel"]


def test_task_metrics():
    tasks = [Task("a", 0, ("x", "y")), Task("b", 2, ("u", "v", "w"), "mean_per_class"), Task("c", 5, ("z",))]
    correct, total = torch.tensor([9, 0, 1, 2, 0, 0]), torch.tensor([9, 1, 1, 4, 0, 0])
    scores = task_scores(correct, total, tasks)
    assert scores == {"a": 0.9, "b": pytest.approx((1 + 0.5) / 2), "c": None}  # class w has no images


def test_bad_tasks_are_clear_errors(two_tasks, backbone):
    with pytest.raises(ValueError, match="at least one task"):
        multitask({})
    with pytest.raises(TypeError, match="not a vlprompt classification data module"):
        multitask({"x": pl.LightningDataModule()})
    with pytest.raises(ValueError, match="tasks that do not exist"):
        multitask(two_tasks, metrics={"nope": "accuracy"})
    with pytest.raises(ValueError, match="sampling must be"):
        multitask(two_tasks, sampling="grouped")
    no_classes = fewshot(next(iter(two_tasks.values())).root)
    no_classes.classnames = []
    with pytest.raises(ValueError, match="task 'empty' has no classes"):
        multitask({**two_tasks, "empty": no_classes})
    model = MultiTaskPromptClassifier(backbone, COOP, ["a", "b", "c"])
    with pytest.raises(ValueError, match="not the prompt's 3"):
        model.set_tasks([Task("t", 0, ("a", "b"))])


def test_k_shots_can_include_the_validation_images(dassl_folder, backbone):
    plain = fewshot(dassl_folder, shots=5)
    carved = fewshot(dassl_folder, shots=5, val_from_train=True, fewshot_dir=str(dassl_folder / "draws"))
    for dm in (plain, carved):
        dm.set_preprocess(backbone.preprocess_cfg)
        dm.setup("fit")
    train, val = carved.datasets["train"].samples, carved.datasets["val"].samples
    assert Counter(s.label for s in val) == {label: 1 for label in range(4)}  # ceil(0.2 * 5)
    assert Counter(s.label for s in train) == {label: 4 for label in range(4)}
    train_split = {s.path for s in carved.samples.train}
    assert {s.path for s in train} | {s.path for s in val} <= train_split and not {s.path for s in train} & {s.path for s in val}
    assert all(s.path not in train_split for s in plain.datasets["val"].samples)  # CoOp: the val split
    one = fewshot(dassl_folder, shots=1, val_from_train=True, fewshot_dir=str(dassl_folder / "draws"))
    one.setup("fit")
    assert [s.path for s in one.datasets["train"].samples] == [s.path for s in one.datasets["val"].samples]


def _saved(learner_cls, backbone, names, path, seed, **kw):
    from vlprompt.prompts import save_prompt

    torch.manual_seed(seed)
    learner = learner_cls(backbone, names, **kw)
    with torch.no_grad():
        for p in learner.parameters():
            p.normal_()
    return learner, save_prompt(learner, path)


@pytest.mark.parametrize("kind", ["coop", "upt"])
def test_seed_prompts_average_into_a_source_prompt_that_initialises_a_target(kind, backbone, tmp_path):
    from vlprompt.methods import load_initial_prompt
    from vlprompt.prompts import UPTPromptLearner, average_prompts, load_prompt

    cls, kw = {"coop": (CoOpPromptLearner, {"n_ctx": 4}), "upt": (UPTPromptLearner, {"n_ctx": 2})}[kind]
    source_names = ["red", "green", "blue", "a star", "a circle"]
    seeds = [_saved(cls, backbone, source_names, tmp_path / f"seed{s}", s, **kw) for s in (1, 2, 3)]
    out = average_prompts([path for _, path in seeds], tmp_path / "source")
    averaged = load_prompt(out, backbone)
    assert averaged.classnames == source_names  # class buffers rebuilt on load
    for key, value in averaged.state_dict().items():
        expected = torch.stack([learner.state_dict()[key] for learner, _ in seeds]).mean(0)
        assert torch.allclose(value, expected, atol=1e-6), key
    # A target learner with other classes starts from it: every learned tensor (UPT's projections too).
    target = cls(backbone, ["yellow", "purple"], **kw)
    load_initial_prompt(target, out)
    assert target.classnames == ["yellow", "purple"]
    for key, value in target.state_dict().items():
        assert torch.equal(value, averaged.state_dict()[key]), key
    with pytest.raises(FileExistsError):
        average_prompts([path for _, path in seeds], tmp_path / "source")


def test_mismatched_prompts_are_refused(backbone, tmp_path, tiny_model_dir):
    from conftest import TINY_CLIP, make_backbone

    from vlprompt.backbones import BackboneMismatchError
    from vlprompt.methods import load_initial_prompt
    from vlprompt.prompts import UPTPromptLearner, VPTPromptLearner, average_prompts

    _, a = _saved(CoOpPromptLearner, backbone, ["x", "y"], tmp_path / "a", 0, n_ctx=4)
    _, wider = _saved(CoOpPromptLearner, backbone, ["x", "y"], tmp_path / "wider", 0, n_ctx=8)
    other = make_backbone(tmp_path / "other_model", {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "width": 32, "heads": 2}})
    _, elsewhere = _saved(CoOpPromptLearner, other, ["x", "y"], tmp_path / "elsewhere", 0, n_ctx=4)
    with pytest.raises(ValueError, match="different methods or settings"):
        average_prompts([a, wider], tmp_path / "out")
    with pytest.raises(BackboneMismatchError):
        average_prompts([a, elsewhere], tmp_path / "out")
    with pytest.raises(BackboneMismatchError):
        load_initial_prompt(CoOpPromptLearner(backbone, ["u"], n_ctx=4), elsewhere)
    with pytest.raises(ValueError, match="tensors do not match.*ctx: saved \\(8, "):
        load_initial_prompt(CoOpPromptLearner(backbone, ["u"], n_ctx=4), wider)
    with pytest.raises(ValueError, match="tensors do not match"):
        load_initial_prompt(UPTPromptLearner(backbone, ["u"], n_ctx=4), a)
    with pytest.raises(ValueError, match="tensors do not match"):
        load_initial_prompt(VPTPromptLearner(backbone, ["u"], n_tokens=4), a)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(set(PROMPT_LEARNERS) - {"zeroshot"}))
def test_every_learner_tunes_on_several_tasks(name, backbone, two_tasks, tmp_path):
    """Generic over learners: one step on the union of classes moves only the prompt, and each
    task is then scored on its own classes."""
    from test_prompt_contract import TINY_KWARGS

    dm = multitask(two_tasks, sampling="round_robin")
    factory = functools.partial(PROMPT_LEARNERS[name], **TINY_KWARGS.get(name, {}))
    pl.seed_everything(0)
    model = MultiTaskPromptClassifier(backbone, factory, dm.classnames, loss="task", optimizer=adam, lr_scheduler="constant")
    before = {k: v.clone() for k, v in model.prompt_learner.state_dict().items()}
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    trainer(tmp_path, max_steps=2).fit(model, datamodule=dm)
    assert any(not torch.equal(v, model.prompt_learner.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in frozen.items())
    trainer(tmp_path).test(model, datamodule=dm, verbose=False)
    assert set(model.task_results) == {"base", "all"}
