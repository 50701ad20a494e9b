"""What the command line must not get silently wrong, and what it must not say on every run:
duplicate task and class names, Lightning's noise, log folders of evaluation runs, runs without a
logger, the gradient regulator's confirmation, and `--help` without PyTorch."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import yaml

from vlprompt.cli import main

from test_cli import CONFIGS, _backbone_yaml, _plain_argv  # noqa: F401 (the autouse fixture applies here too)


def _fit_args(tmp_path: Path, model_dir: Path, data: Path, *extra: str, command: str = "fit") -> list[str]:
    return [command, "--config", str(CONFIGS / "methods" / "coop.yaml"), "--config", _backbone_yaml(tmp_path, model_dir),
            "--data", "vlprompt.data.FewShotDataModule", f"--data.root={data}", "--data.shots=2", "--data.num_workers=0",
            "--data.batch_size=4", "--trainer.max_epochs=1", "--trainer.accelerator=cpu", *extra]


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    return capsys.readouterr().err


# -- A: task names ------------------------------------------------------------------------------------
_TASKS_TWICE = """\
backbone: {class_path: vlprompt.backbones.OpenCLIPBackbone, init_args: {model_name: local-dir:MODEL}}
source:
  tasks:
    colour: {class_path: vlprompt.data.FewShotDataModule, init_args: {root: DATA, subset: base}}
    colour: {class_path: vlprompt.data.FewShotDataModule, init_args: {root: DATA, subset: novel}}
targets:
  tasks:
    all: {class_path: vlprompt.data.FewShotDataModule, init_args: {root: DATA}}
methods:
  coop: {config: methods/mvlpt_coop.yaml}
"""


def test_a_task_name_given_twice_in_a_multitask_config_is_refused(tmp_path, tiny_model_dir, dassl_folder, capsys):
    from vlprompt.apps.multitask import load_multitask_config

    path = tmp_path / "multitask.yaml"
    path.write_text(_TASKS_TWICE.replace("MODEL", str(tiny_model_dir)).replace("DATA", str(dassl_folder)))
    # A YAML loader keeps the second "colour" (the novel classes) under the name of the first.
    with pytest.raises(ValueError, match=r"task 'colour' is given twice in source\.tasks \(lines 4 and 5\)"):
        load_multitask_config(path)
    err = _error(capsys, ["eval-multitask", "--config", str(path), "--output-dir", str(tmp_path / "out")])
    assert err.splitlines()[-2].startswith("vlprompt eval-multitask: error: ") and "'colour' is given twice" in err
    assert not (tmp_path / "out").exists()


def test_the_multitask_data_module_refuses_two_tasks_of_one_name(image_folder, dassl_folder):
    from vlprompt.data import FewShotDataModule
    from vlprompt.data.multitask import MultiTaskDataModule

    base = FewShotDataModule(str(dassl_folder), shots=2, subset="base", num_workers=0)
    novel = FewShotDataModule(str(dassl_folder), shots=2, subset="novel", num_workers=0)
    with pytest.raises(ValueError, match="task 'colour' is given twice"):
        MultiTaskDataModule([("colour", base), ("colour", novel)])
    # The mean over tasks is logged as <stage>/acc: a task of that name would be overwritten by it.
    with pytest.raises(ValueError, match="'acc' is reserved"):
        MultiTaskDataModule({"acc": base, "novel": novel})
    assert [t.name for t in MultiTaskDataModule([("base", base), ("novel", novel)]).tasks] == ["base", "novel"]


def test_a_key_given_twice_in_a_fit_config_is_refused_with_the_file_named(tmp_path, tiny_model_dir, dassl_folder, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("trainer:\n  max_epochs: 1\ntrainer:\n  max_epochs: 3\n")
    err = _error(capsys, _fit_args(tmp_path, tiny_model_dir, dassl_folder, "--config", str(twice),
                                   "--trainer.default_root_dir", str(tmp_path / "logs")))
    assert f"{twice}: key 'trainer' is given twice at the top level (lines 1 and 3)" in err
    # A data module's own file (not a --config) is read by jsonargparse: refused there too.
    data = tmp_path / "data.yaml"
    data.write_text(f"class_path: vlprompt.data.FewShotDataModule\ninit_args:\n  root: {dassl_folder}\n"
                    f"  shots: 2\n  shots: 4\n")
    err = _error(capsys, [*_fit_args(tmp_path, tiny_model_dir, dassl_folder)[:5], "--data", str(data),
                          "--trainer.default_root_dir", str(tmp_path / "logs")])
    assert "key 'shots' is given twice in init_args" in err
    assert not (tmp_path / "logs").exists()


# -- B: classify's class names ---------------------------------------------------------------------------
def test_classify_refuses_a_class_name_given_twice(tmp_path, image_folder, capsys):
    from vlprompt.apps.classify import classify_images
    from vlprompt.backbones import OpenCLIPBackbone
    from vlprompt.prompts import CoOpPromptLearner, save_prompt

    # The embedded model: `classify` rebuilds it from the prompt's record with the same weights.
    learner = CoOpPromptLearner(OpenCLIPBackbone("zoo:shapeworld-clip-tiny"), ["red square", "blue square"], n_ctx=2)
    save_prompt(learner, tmp_path / "prompt")
    out = tmp_path / "out"
    err = _error(capsys, ["classify", "--prompt", str(tmp_path / "prompt"), "--images", str(image_folder),
                          "--classnames", "coat", "coat", "bag", "--out", str(out), "--device", "cpu"])
    assert "vlprompt classify: error: --classnames: duplicate class names: 'coat' and 'coat'" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="duplicate class names"):
        classify_images(learner, image_folder, classnames=["Coat", "coat ", "bag"], device="cpu")
    assert learner.classnames == ["red square", "blue square"]


# -- C: Lightning's noise --------------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_run_shows_no_advertisement_no_leafspec_warning_and_no_version_number(tmp_path, tiny_model_dir, dassl_folder):
    from vlprompt.apps.train import run_lightning_cli
    from vlprompt.cli import _quiet_lightning, _setup_logging

    records = _Records()
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _setup_logging()  # what `vlprompt` does before running a command
            _quiet_lightning()
            cli = run_lightning_cli(_fit_args(tmp_path, tiny_model_dir, dassl_folder, f"--trainer.default_root_dir={tmp_path}"))
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert not [m for m in records.messages if "litlogger" in m or "litmodels" in m]
    assert any("GPU available" in m for m in records.messages)  # Lightning's other messages still pass
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    shown = cli.trainer.progress_bar_callback.get_metrics(cli.trainer, cli.model)
    assert "train/loss" in shown and "v_num" not in shown


def test_segmentation_data_without_validation_is_not_announced_by_the_image_data_module(tmp_path, caplog):
    from vlprompt.data import SegmentationDataModule, world

    world.write_segmentation_dataset(tmp_path / "seg", n_train=4, n_val=0, n_test=2, domain="clean")
    dm = SegmentationDataModule(str(tmp_path / "seg"), num_workers=0)
    with caplog.at_level(logging.INFO, logger="vlprompt"):
        dm.setup("fit")  # what Lightning does in fit, then it asks for the validation loader
        assert dm.val_dataloader() == []
    assert not [r for r in caplog.records if "validation" in r.getMessage()], caplog.text
    assert dm.no_val_split and "train" in dm.datasets


# -- D, E: where runs write --------------------------------------------------------------------------------
def test_evaluating_a_run_opens_no_new_log_folder(tmp_path, tiny_model_dir, dassl_folder):
    root = f"--trainer.default_root_dir={tmp_path}"
    main(_fit_args(tmp_path, tiny_model_dir, dassl_folder, root, "--trainer.enable_progress_bar=false"))
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    for command in ("test", "validate"):
        main(_fit_args(tmp_path, tiny_model_dir, dassl_folder, root, f"--ckpt_path={ckpt}", "--trainer.enable_progress_bar=false",
                       command=command))
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert not (tmp_path / "config.yaml").exists()
    # A logger asked for logs the test into a folder of its own, with its config.
    main(_fit_args(tmp_path, tiny_model_dir, dassl_folder, root, f"--ckpt_path={ckpt}", "--trainer.logger=true",
                   "--trainer.enable_progress_bar=false", command="test"))
    assert (tmp_path / "lightning_logs" / "version_1" / "config.yaml").is_file()


def test_fit_twice_without_a_logger_in_one_folder(tmp_path, tiny_model_dir, dassl_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second run used to refuse: the first left config.yaml in the working directory
        main(_fit_args(tmp_path, tiny_model_dir, dassl_folder, "--trainer.logger=false", "--trainer.enable_progress_bar=false"))
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()
    for run in ("version_0", "version_1"):
        folder = tmp_path / "lightning_logs" / run
        assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
        assert (folder / "prompt" / "prompt.safetensors").is_file()
        assert not list(folder.glob("events.out.tfevents*"))  # no logger: no metric logs


# -- F: the gradient regulator says it is there ------------------------------------------------------------
def test_gradient_regulation_says_once_which_regulator_from_where(backbone, image_folder, tmp_path, caplog):
    import lightning.pytorch as pl

    from vlprompt.data import FewShotDataModule
    from vlprompt.methods import GRAMMetaLearner, GradientRegulation, PromptClassifier
    from vlprompt.prompts import CoOpPromptLearner

    coop = functools.partial(CoOpPromptLearner, n_ctx=2)
    meta = GRAMMetaLearner(backbone, coop, n_way=3, regulator_hidden=4).save_meta_prompt(tmp_path / "meta")
    classes = ["red square", "green square", "blue square", "yellow square"]
    model = PromptClassifier(backbone, coop, classes, init_prompt=str(meta), lr_scheduler="constant")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_train_batches=1, limit_val_batches=0,
                         callbacks=[GradientRegulation(str(meta))])
    with caplog.at_level(logging.INFO, logger="vlprompt.methods.gram"):
        trainer.fit(model, datamodule=FewShotDataModule(str(image_folder), shots=2, batch_size=4, num_workers=0))
    said = [r.getMessage() for r in caplog.records if "gradient regulation" in r.getMessage()]
    assert len(said) == 1 and str(meta.resolve()) in said[0] and "gram-elementwise-v1 (hidden 4" in said[0], said


# -- G: --help without PyTorch -------------------------------------------------------------------------------
def _fresh(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_the_applications_help_imports_no_torch():
    done = _fresh("""
        import sys
        from vlprompt.cli import main
        for command in ("eval-fewshot", "eval-multitask", "transferability", "demo", "classify", "segment"):
            try:
                main([command, "--help"])
            except SystemExit as done:
                assert done.code in (0, None), command
        print("TORCH", "torch" in sys.modules, "lightning" in sys.modules)
        """)
    assert done.returncode == 0, done.stderr[-2000:]
    for prog in ("eval-fewshot", "eval-multitask", "transferability", "demo", "classify", "segment"):
        assert f"usage: vlprompt {prog} " in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "TORCH False False"


def test_the_lightning_commands_help_is_kept_and_then_needs_no_torch(tmp_path, monkeypatch, capsys):
    env = {"VLPROMPT_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "100"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    main(["test", "--help"])  # built by LightningCLI here (Lightning is imported already)
    built = capsys.readouterr().out
    assert "--trainer.logger" in built and "--ckpt_path" in built
    kept = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "help").glob("*.txt"))
    assert kept == ["fit", "predict", "test", "tta", "validate"]  # one miss keeps all five
    again = _fresh("""
        import sys
        sys.argv[0] = "vlprompt"
        from vlprompt.cli import main
        main(["test", "--help"])
        print("TORCH", "torch" in sys.modules, "lightning" in sys.modules)
        """, env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.rsplit("TORCH", 1) == [built, " False False\n"]


def test_the_cached_help_is_one_text_for_every_wide_terminal(monkeypatch):
    from vlprompt.cli import _HELP_MAX_COLUMNS, _help_cache_file, _help_columns

    def key(columns: str) -> str:
        monkeypatch.setenv("COLUMNS", columns)
        with _help_columns():
            assert int(os.environ["COLUMNS"]) == min(int(columns), _HELP_MAX_COLUMNS)
            return _help_cache_file(["fit", "--help"]).name
    assert key("120") == key("200") == key("400") != key("100") != key("80")
    assert os.environ["COLUMNS"] == "80"  # restored
