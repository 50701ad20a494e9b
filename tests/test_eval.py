"""Few-shot evaluation runner, result tables and plots."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import yaml

from vlprompt.apps.fewshot import EvaluationConfig, TransferProtocol, format_report, load_eval_config, run_fewshot_eval
from vlprompt.eval.plots import plot_accuracy_vs_shots
from vlprompt.eval.tables import Result, base_novel_table, harmonic_mean, read_csv, shots_table, summarise, transfer_table
from vlprompt.resources import bundled_dir


def test_harmonic_mean_and_summary():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(68.571, abs=1e-3)
    assert harmonic_mean(0.0, 0.0) == 0.0
    results = [Result("coop", 4, s, "all", a) for s, a in ((1, 70.0), (2, 74.0))]
    mean, std, n = summarise(results)[("coop", 4, "all")]
    assert (mean, n) == (72.0, 2) and std == pytest.approx(2.828, abs=1e-3)


def test_tables_and_plot(tmp_path):
    results = [
        Result("zeroshot", 0, 0, "all", 50.0),
        Result("zeroshot", 0, 0, "base", 55.0),
        Result("zeroshot", 0, 0, "novel", 45.0),
        *[Result("coop", k, 1, "all", 50.0 + 5 * k) for k in (1, 2, 4)],
        Result("coop", 4, 1, "base", 80.0),
        Result("coop", 4, 1, "novel", 40.0),
    ]
    table = shots_table(results, ["zeroshot", "coop"])
    assert "| coop | 55.0 | 60.0 | 70.0 |" in table and "| zeroshot | 50.0 | 50.0 | 50.0 |" in table
    assert "| coop | 80.0 | 40.0 | 53.3 |" in base_novel_table(results, ["zeroshot", "coop"])
    png = plot_accuracy_vs_shots(results, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    transfer = [Result("coop", 16, seed, "transfer", acc, data) for seed, accs in ((1, (90, 60, 40)), (2, (80, 50, 30)))
                for data, acc in zip(("source", "t1", "t2"), accs)]
    assert "| coop | 85.0 ± 7.1 | 55.0 ± 7.1 | 35.0 ± 7.1 | 45.0 ± 7.1 |" in transfer_table(transfer, ["coop"], ["t1", "t2"])
    report = format_report(results).splitlines()
    assert "  coop                 80.0   40.0   53.3" in report
    assert "  all classes | coop 4-shot         70.0%" in report


def _backbone(model_dir):
    return {"class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": {"model_name": f"local-dir:{model_dir}"}}


def _data(root, **init_args):
    return {"class_path": "vlprompt.data.FewShotDataModule",
            "init_args": {"root": str(root), "num_workers": 0, "batch_size": 4, **init_args}}


COOP = {"config": "methods/coop.yaml", "model": {"prompt_learner": {"init_args": {"n_ctx": 2}}}, "trainer": {"max_epochs": 1}}


def test_runner_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, dassl_folder):
    cfg = EvaluationConfig(
        backbone=_backbone(tiny_model_dir),
        data=_data(dassl_folder),
        methods={"coop": COOP},
        shots=[1, 2],
        seeds=[1, 2],
        base_to_novel={"shots": 2},
        trainer={"accelerator": "cpu"},
    )
    results = run_fewshot_eval(cfg, tmp_path / "out")
    settings = sorted({(r.method, r.shots, r.setting) for r in results})
    assert ("zeroshot", 0, "novel") in settings and ("coop", 2, "novel") in settings and ("coop", 1, "all") in settings
    assert len([r for r in results if r.method == "coop"]) == 2 * 2 + 2 * 2  # shots x seeds + (base, novel) x seeds
    assert read_csv(tmp_path / "out" / "results.csv") == results
    assert "Base-to-novel" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "accuracy_vs_shots.png").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_fewshot_eval(cfg, tmp_path / "out")


def test_method_recipe_is_the_method_yaml_with_overrides(backbone):
    recipe = EvaluationConfig(backbone=_backbone("x"), data=_data("x"), methods={"coop": COOP}).recipe("coop")
    model, trainer_args = recipe.build(backbone, ["a", "b"])
    assert model.prompt_learner.n_ctx == 2 and trainer_args == {"max_epochs": 1}
    optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.002  # from configs/methods/coop.yaml
    with pytest.raises(ValueError, match="config"):
        EvaluationConfig(backbone=_backbone("x"), data=_data("x"), methods={"coop": {"prompt_learner": {}}})
    with pytest.raises(ValueError, match="class_path"):
        EvaluationConfig(backbone={"model_name": "x"}, data=_data("x"), methods={})


def test_transfer_protocol_tests_each_target_with_its_own_classes(tmp_path, tiny_model_dir, dassl_folder, image_folder):
    from vlprompt.backbones import OpenCLIPBackbone
    from vlprompt.data import FewShotDataModule
    from vlprompt.methods import PromptClassifier
    from vlprompt.prompts import load_prompt

    cfg = EvaluationConfig(
        backbone=_backbone(tiny_model_dir),
        data=_data(dassl_folder),
        methods={"coop": COOP},
        shots=[],
        seeds=[1, 2],
        base_to_novel=None,
        transfer=TransferProtocol(name="cross-dataset", shots=2, subset="base",
                                  targets={"folder": _data(image_folder, shots=-1)}),
        trainer={"accelerator": "cpu"},
        save_prompts=True,
    )
    torch.manual_seed(0)  # the runner's random tiny backbone, built again below with the same weights
    results = run_fewshot_eval(cfg, tmp_path / "out")
    transfer = [r for r in results if r.setting == "transfer"]
    assert sorted({(r.method, r.dataset) for r in transfer}) == [
        ("coop", "folder"), ("coop", "source"), ("zeroshot", "folder"), ("zeroshot", "source")]
    assert len([r for r in transfer if r.method == "coop"]) == 2 * 2  # (source, target) x seeds
    # The target's number is the learned prompt evaluated on the target with the target's classes.
    torch.manual_seed(0)
    prompt = load_prompt(tmp_path / "out" / "prompts" / "coop_transfer_2shot_seed2", OpenCLIPBackbone(f"local-dir:{tiny_model_dir}"))
    assert prompt.classnames == ["red square", "green square"]  # the source's base classes
    target = FewShotDataModule(str(image_folder), shots=-1, num_workers=0)
    model = PromptClassifier(prompt.backbone, lambda b, c: prompt, prompt.classnames)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    expected = 100 * trainer.test(model, datamodule=target, verbose=False)[0]["test/acc"]
    got = [r.accuracy for r in transfer if r.method == "coop" and r.seed == 2 and r.dataset == "folder"]
    assert got == [pytest.approx(expected)]
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| method | source | folder | target mean |" in table
    targets = [r.accuracy for r in transfer if r.method == "coop" and r.dataset == "folder"]
    assert f"{sum(targets) / 2:.1f}" in table.split("| coop |")[1].splitlines()[0]


def test_shipped_evaluation_configs_parse():
    """Every evaluation YAML in configs/eval/ refers to method YAMLs that parse with the CLI's types."""
    for path in sorted((bundled_dir("configs") / "eval").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        runner = raw["runner"]  # every shipped config declares its runner
        if runner == "tta":
            continue
        if runner == "multitask":  # multitask (MVLPT): each method builds multitask and single-task models
            from vlprompt.apps.multitask import load_multitask_config
            from vlprompt.methods import MultiTaskPromptClassifier, PromptClassifier

            cfg = load_multitask_config(path)
            for name in cfg.methods:
                cfg.recipe(name, MultiTaskPromptClassifier, "source_trainer")
                cfg.recipe(name, PromptClassifier)
            continue
        if runner == "transferability":
            from vlprompt.apps.transferability import load_transferability_config

            load_transferability_config(path).recipe()
            continue
        if runner == "gram":  # one few-shot evaluation per setting
            from vlprompt.apps.fewshot import EvaluationConfig
            from vlprompt.apps.gram import load_settings

            settings, rest = load_settings(path)
            cfg = EvaluationConfig(**{**rest, "data": next(iter(settings.values()))}, config_dir=path.parent)
        else:
            cfg = load_eval_config(path)
        for name in cfg.methods:
            recipe = cfg.recipe(name)
            if name.endswith("+gram"):  # the trainer callbacks (the regulator) build too
                from vlprompt.methods import GradientRegulation

                assert any(isinstance(c, GradientRegulation) for c in recipe.trainer_args(recipe.instantiate())["callbacks"])


def test_a_config_declares_its_runner_and_the_wrong_command_says_which(tmp_path):
    from vlprompt.apps.multitask import load_multitask_config
    from vlprompt.apps.runner import RUNNERS, declared_runner

    shipped = bundled_dir("configs")
    assert declared_runner(yaml.safe_load((shipped / "eval" / "shapeworld_demo.yaml").read_text()), "x") == "fewshot"
    with pytest.raises(ValueError, match=r"declares `runner: multitask`: run it with `vlprompt eval-multitask`"):
        load_eval_config(shipped / "eval" / "shapeworld_multitask.yaml")
    with pytest.raises(ValueError, match=r"declares `runner: fewshot`: run it with `vlprompt eval-fewshot`"):
        load_multitask_config(shipped / "eval" / "shapeworld_demo.yaml")
    # A config written before `runner:` existed: its own command still reads it ...
    old = tmp_path / "old_multitask.yaml"
    raw = yaml.safe_load((shipped / "eval" / "shapeworld_multitask.yaml").read_text())
    old.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "runner"}))
    assert load_multitask_config(old).methods
    # ... and where it would be read as a few-shot config, the error says what changed.
    with pytest.raises(ValueError, match=r"unknown keys \['source', 'targets'\].*declares it with `runner:`"):
        load_eval_config(old)
    bad = tmp_path / "bad.yaml"
    bad.write_text("runner: fewshots\n")
    with pytest.raises(ValueError, match="is not a runner of vlprompt"):
        load_eval_config(bad)
    assert set(RUNNERS.values()) <= {"eval-fewshot", "eval-multitask", "transferability", "demo"}
