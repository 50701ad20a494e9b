"""MVLPT's protocol (Shen et al., WACV 2024; ``scripts/mvlpt/main_single_elevater_cut.sh`` with Dassl's
``TEST.FINAL_MODEL best_val``) in ``vlprompt eval-multitask``: every tuning keeps its best validation
epoch (validated after each epoch, strictly better to replace, a tie keeps the earlier epoch) and the
source is tuned with the target's shot count; the defaults (last epoch, a fixed source shot count)
unchanged. On the embedded ShapeWorld multitask config, with small ShapeWorld folders and 3 epochs."""

from __future__ import annotations

import argparse
import json
import math

import lightning.pytorch as pl
import pytest
import torch
import yaml

from vlprompt.apps.multitask import load_multitask_config, run_multitask_eval
from vlprompt.apps.runner import bundled_dir
from vlprompt.data.world.writers import write_classification_dataset
from vlprompt.methods.best_validation import BestValidationPrompt
from vlprompt.prompts import read_prompt_tensors

SOURCE, TARGET = ("colour", "shape"), "pairs"


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Small ShapeWorld folders (4 train, 2 val, 4 test images per class) where the data modules
    look for them, marked as ensure_shapeworld marks its own."""
    roots = {}
    for task in (*SOURCE, TARGET):
        root = tmp_path_factory.mktemp(f"shapeworld-{task}")
        write_classification_dataset(root, n_train_per_class=4, n_val_per_class=2, n_test_per_class=4,
                                     domain="negative", task=task)
        marker = {"domain": "negative", "seed": 0, **({"task": task} if task != "pairs" else {})}
        (root / "shapeworld.json").write_text(json.dumps(marker) + "\n")
        roots[task] = str(root)
    return roots


class Recorder(pl.Callback):
    """Per fit: the validation scores and the prompt after each validation, the prompt the fit ends
    with, and the prompt of every test run after it."""

    def __init__(self) -> None:
        self.fits: list[dict] = []

    @staticmethod
    def _ctx(module):
        return module.prompt_learner.ctx.detach().clone()

    def on_fit_start(self, trainer, module):
        self.fits.append({"module": module, "scores": [], "prompts": [], "final": None, "tested": []})

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.fits[-1]["scores"].append(float(trainer.callback_metrics["val/acc"]))
            self.fits[-1]["prompts"].append(self._ctx(module))

    def on_fit_end(self, trainer, module):
        self.fits[-1]["final"] = self._ctx(module)

    def on_test_start(self, trainer, module):
        for fit in self.fits:
            if fit["module"] is module:
                fit["tested"].append(self._ctx(module))


def _config(worlds, tmp_path, **changes):
    raw = yaml.safe_load((bundled_dir("configs") / "eval" / "shapeworld_multitask.yaml").read_text())
    for side, names in (("source", SOURCE), ("targets", (TARGET,))):
        raw[side]["tasks"] = {n: raw[side]["tasks"][n] for n in names}
        for name in names:
            raw[side]["tasks"][name]["init_args"]["root"] = worlds[name]
    raw["source"].update(shots=2, seeds=[1, 2])
    raw["targets"].update(shots=[1, 2], seeds=[1])
    raw["methods"] = {"coop": {**raw["methods"]["coop"], "trainer": {"max_epochs": 3}, "source_trainer": {"max_epochs": 3}}}
    for side, values in changes.items():
        raw[side].update(values)
    path = tmp_path / "multitask.yaml"
    raw["methods"]["coop"]["config"] = str(bundled_dir("configs") / "methods" / "mvlpt_coop.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_multitask_config(path)
    recorder = Recorder()
    cfg.trainer["callbacks"] = [recorder]
    return cfg, recorder


def test_best_validation_prompts_are_the_ones_tested_saved_and_averaged(worlds, tmp_path):
    cfg, recorder = _config(worlds, tmp_path, source={"final_model": "best_val"}, targets={"final_model": "best_val"})
    results = run_multitask_eval(cfg, tmp_path / "out")
    # 2 source seeds; per target shot count: single, mvlpt-init, multitask
    assert len(recorder.fits) == 2 + 2 * 3
    bests = []
    for fit in recorder.fits:
        assert len(fit["scores"]) == 3  # validated after every epoch
        best = fit["scores"].index(max(fit["scores"]))  # the first best: a tie keeps the earlier epoch
        assert torch.equal(fit["final"], fit["prompts"][best])
        assert fit["tested"] and all(torch.equal(t, fit["prompts"][best]) for t in fit["tested"])
        bests.append(best)
    assert min(bests) < 2  # here some fits' best epoch is not the last (ties and drops)
    prompts = tmp_path / "out" / "prompts" / "coop"
    seeds = [read_prompt_tensors(prompts / f"source-seed{s}")["ctx"] for s in (1, 2)]
    for seed, fit in zip(seeds, recorder.fits[:2]):
        assert torch.equal(seed, fit["final"])
    torch.testing.assert_close(read_prompt_tensors(prompts / "source")["ctx"], (seeds[0] + seeds[1]) / 2)
    assert {r.setting for r in results} == {"zero-shot", "source", "single", "mvlpt-init", "multitask"}
    assert "best-validation prompts averaged" in (tmp_path / "out" / "summary.md").read_text()


def test_the_defaults_keep_the_last_epoch_and_validate_nothing(worlds, tmp_path):
    cfg, recorder = _config(worlds, tmp_path, targets={"shots": [1]})
    assert cfg.source.final_model == cfg.targets.final_model == "last"
    run_multitask_eval(cfg, tmp_path / "out")
    assert len(recorder.fits) == 2 + 3
    assert all(fit["scores"] == [] for fit in recorder.fits)


def test_the_source_follows_the_target_shot_count_when_asked(worlds, tmp_path, monkeypatch):
    from vlprompt.apps import multitask

    cfg, _ = _config(worlds, tmp_path, source={"shots": "target", "seeds": [1]})
    sources = []
    original = multitask._Runner.tasks

    def tasks(self, task_set, shots, seed):
        if task_set is self.cfg.source:
            sources.append(shots)
        return original(self, task_set, shots, seed)

    monkeypatch.setattr(multitask._Runner, "tasks", tasks)
    results = run_multitask_eval(cfg, tmp_path / "out")
    # each source prompt tuned (and tested) once per target shot count, in turn
    assert sources == [1, 1, 2, 2]
    prompts = tmp_path / "out" / "prompts" / "coop"
    assert (prompts / "source-1shot").is_dir() and (prompts / "source-2shot").is_dir()
    assert not (prompts / "source").exists()
    assert sorted((r.shots, r.dataset) for r in results if r.setting == "source") == [(1, TARGET), (2, TARGET)]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "each target's shots" in summary and summary.count("| coop | source |") == 2


def test_a_fixed_source_shot_count_is_tuned_once(worlds, tmp_path, monkeypatch):
    from vlprompt.apps import multitask

    cfg, _ = _config(worlds, tmp_path, source={"seeds": [1]})
    sources = []
    original = multitask._Runner.tasks
    monkeypatch.setattr(multitask._Runner, "tasks", lambda self, ts, shots, seed: (
        sources.append(shots) if ts is self.cfg.source else None) or original(self, ts, shots, seed))
    results = run_multitask_eval(cfg, tmp_path / "out")
    assert sources == [2, 2]  # tuned once, tested once
    assert [r.shots for r in results if r.setting == "source"] == [0]  # one untuned source row for every table


def test_bad_protocol_settings_are_refused(worlds, tmp_path):
    # jsonargparse checks the value against the type first (an ArgumentError)
    with pytest.raises((ValueError, argparse.ArgumentError), match=r"(?s)final_model.*'last', 'best_val'.*Got value: best"):
        _config(worlds, tmp_path, source={"final_model": "best"})
    with pytest.raises((ValueError, argparse.ArgumentError), match="`target` is for the source"):
        _config(worlds, tmp_path, targets={"shots": "target"})


class _Scripted(pl.LightningModule):
    """A module whose validation score follows a script, its one parameter counting the epochs."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores
        self.prompt = torch.nn.Parameter(torch.zeros(1))
        self.backbone = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return (self.prompt * 0).sum()

    def on_train_epoch_end(self):
        pass

    def on_validation_epoch_end(self):
        self.log("val/acc", self.scores[self.current_epoch])

    def validation_step(self, batch, batch_idx):
        pass

    def on_train_epoch_start(self):
        with torch.no_grad():
            self.prompt.fill_(self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD([self.prompt], lr=0.0)

    def train_dataloader(self):
        return [torch.zeros(1)]

    def val_dataloader(self):
        return [torch.zeros(1)]


@pytest.mark.parametrize("scores, epoch", [([0.2, 0.5, 0.5, 0.3], 1), ([0.1, 0.2, 0.3, 0.4], 3),
                                           ([0.4, 0.4, 0.4, 0.4], 0), ([math.nan, 0.1, math.nan, 0.0], 1)])
def test_best_validation_is_strictly_better_and_ties_keep_the_earlier_epoch(scores, epoch):
    module, best = _Scripted(scores), BestValidationPrompt()
    pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[best], num_sanity_val_steps=0).fit(module)
    assert best.best_epoch == epoch and module.prompt.item() == epoch
    assert best.scores[:2] == pytest.approx(scores[:2], nan_ok=True)
    assert set(best.state_dict()["best_state"]) == {"prompt"}  # the frozen encoder is not copied


def test_one_task_scored_per_class_is_picked_by_its_per_class_mean(backbone, dassl_folder):
    """ELEVATER's mean-per-class targets: MVLPT picks the best epoch by the dataset's own metric."""
    from vlprompt.apps.multitask import best_val_monitor
    from vlprompt.data import FewShotDataModule
    from vlprompt.methods import MultiTaskPromptClassifier, PromptClassifier
    from vlprompt.prompts import CoOpPromptLearner

    dm = FewShotDataModule(dassl_folder, shots=4, batch_size=4, num_workers=0, augment=False)
    model = PromptClassifier(backbone, lambda b, c: CoOpPromptLearner(b, c, n_ctx=2), dm.classnames)
    assert best_val_monitor(model, dm) == "val/acc"
    dm.metric = "mean_per_class"
    assert best_val_monitor(model, dm) == "val/acc_per_class_mean"
    multi = MultiTaskPromptClassifier(backbone, lambda b, c: CoOpPromptLearner(b, c, n_ctx=2), dm.classnames)
    assert best_val_monitor(multi, dm) == "val/acc"  # the mean of the tasks' own metrics
    logged = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False).validate(model, datamodule=dm, verbose=False)[0]
    correct, total = torch.zeros(len(dm.classnames)), torch.zeros(len(dm.classnames))
    with torch.no_grad():
        for batch in dm.val_dataloader():
            hit = model(images=batch["image"]).argmax(-1) == batch["label"]
            total += torch.bincount(batch["label"], minlength=len(total))
            correct += torch.bincount(batch["label"][hit], minlength=len(total))
    per_class = correct[total > 0] / total[total > 0]
    assert logged["val/acc_per_class_mean"] == pytest.approx(per_class.mean().item(), abs=1e-6)
    assert logged["val/acc"] == pytest.approx((correct.sum() / total.sum()).item(), abs=1e-6)


def test_the_best_prompt_survives_a_checkpoint_of_the_callback():
    module, best = _Scripted([0.2, 0.5, 0.1, 0.3]), BestValidationPrompt()
    pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[best], num_sanity_val_steps=0).fit(module)
    resumed, other = BestValidationPrompt(), _Scripted([])
    resumed.load_state_dict(best.state_dict())
    with torch.no_grad():
        other.prompt.fill_(99.0)
    resumed.on_train_end(None, other)
    assert other.prompt.item() == 1.0 and resumed.best_epoch == 1 and resumed.scores == pytest.approx([0.2, 0.5, 0.1, 0.3])
