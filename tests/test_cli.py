"""`vlprompt fit|validate|test` smoke runs with the shipped method configs and fast_dev_run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import COLOURS
from vlprompt.apps.train import run_lightning_cli
from vlprompt.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI reads sys.argv too; pytest's own arguments must not reach it.
    monkeypatch.setattr(sys, "argv", ["vlprompt"])


def _backbone_yaml(tmp_path: Path, model_dir: Path) -> str:
    path = tmp_path / "backbone.yaml"
    path.write_text(yaml.safe_dump({"model": {"backbone": {
        "class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": {"model_name": f"local-dir:{model_dir}"}}}}))
    return str(path)


def _data_args(root: Path) -> list[str]:
    return ["--data", "vlprompt.data.FewShotDataModule", f"--data.root={root}", "--data.shots=2",
            "--data.num_workers=0", "--data.batch_size=4"]


@pytest.mark.parametrize("method", ["coop", "cocoop", "vpt", "ivlp", "maple", "upt", "promptsrc", "kgcoop", "dept", "decoupled_dept"])
def test_fit_fast_dev_run_and_save_prompt(method, tmp_path, tiny_model_dir, dassl_folder):
    target = tmp_path / "prompt"
    main(["fit", "--config", str(CONFIGS / "methods" / f"{method}.yaml"), "--config", _backbone_yaml(tmp_path, tiny_model_dir),
          *_data_args(dassl_folder), "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
          f"--trainer.default_root_dir={tmp_path}", f"--save_prompt={target}"])
    assert (target / "prompt.safetensors").is_file()
    assert yaml.safe_load((target / "config.json").read_text())["method"] == method
    # The saved prompt loads back through the same CLI and evaluates, here on the novel classes.
    main(["test", "--config", str(CONFIGS / "methods" / f"{method}.yaml"), "--config", _backbone_yaml(tmp_path, tiny_model_dir),
          *_data_args(dassl_folder), "--data.subset=novel", f"--model.init_prompt={target}",
          "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])


def test_fit_then_test_on_novel_classes(tmp_path, tiny_model_dir, dassl_folder):
    common = ["--config", str(CONFIGS / "methods" / "coop.yaml"), "--config", _backbone_yaml(tmp_path, tiny_model_dir),
              "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
              "--trainer.enable_progress_bar=false"]
    main(["fit", *common, *_data_args(dassl_folder), "--data.subset=base"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    # An interrupted fit resumes from last.ckpt and carries on to the new max_epochs.
    main(["fit", *common, *_data_args(dassl_folder), "--data.subset=base", "--trainer.max_epochs=2", f"--ckpt_path={ckpt}"])
    assert len(list(tmp_path.rglob("last.ckpt"))) == 2
    tested = run_lightning_cli(["test", *common, *_data_args(dassl_folder), "--data.subset=novel", f"--ckpt_path={ckpt}"])
    # The checkpoint's prompt, re-pointed at the 2 novel classes, scored on their 12 test images.
    assert tested.model.prompt_learner.classnames == ["blue square", "yellow square"]
    assert tested.trainer.callback_metrics["test/images"] == 12
    validated = run_lightning_cli(["validate", *common, *_data_args(dassl_folder), f"--ckpt_path={ckpt}"])
    assert validated.model.prompt_learner.classnames == list(COLOURS)
    assert "val/acc" in validated.trainer.callback_metrics


def test_zero_shot_test_run_equals_the_library(tmp_path, tiny_model_dir, image_folder):
    import lightning.pytorch as pl

    from vlprompt.data import FewShotDataModule
    from vlprompt.methods import PromptClassifier
    from vlprompt.prompts import ZeroShotPrompt

    cli = run_lightning_cli(["test", "--config", str(CONFIGS / "methods" / "zeroshot.yaml"), "--config",
                             _backbone_yaml(tmp_path, tiny_model_dir), *_data_args(image_folder), "--trainer.accelerator=cpu",
                             f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    dm = FewShotDataModule(str(image_folder), shots=2, num_workers=0)
    model = PromptClassifier(cli.model.backbone, lambda b, c: ZeroShotPrompt(b, c, templates="a photo of a {}."), dm.classnames)
    expected = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(model, datamodule=dm, verbose=False)
    assert cli.trainer.callback_metrics["test/acc"].item() == pytest.approx(expected[0]["test/acc"])


def test_console_script_is_installed():
    exe = shutil.which("vlprompt") or str(Path(sys.executable).parent / "vlprompt")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fit" in out.stdout and "test" in out.stdout


def test_one_cli_runs_a_classifier_named_by_class_path(tmp_path, tiny_model_dir, dassl_folder, capsys):
    """One LightningCLI serves every module: a config naming the classifier's class_path gets the
    data's class names linked in as the plain one does; a class_path that is no LightningModule is
    refused in one line."""
    method = yaml.safe_load((CONFIGS / "methods" / "coop.yaml").read_text())
    backbone = yaml.safe_load(Path(_backbone_yaml(tmp_path, tiny_model_dir)).read_text())["model"]
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump({**method, "model": {"class_path": "vlprompt.methods.PromptClassifier",
                                                         "init_args": {**method["model"], **backbone}}}))
    target = tmp_path / "prompt"
    main(["fit", "--config", str(named), *_data_args(dassl_folder), "--trainer.fast_dev_run=true",
          "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", f"--save_prompt={target}"])
    assert yaml.safe_load((target / "config.json").read_text())["method"] == "coop"
    named.write_text(yaml.safe_dump({"model": {"class_path": "vlprompt.data.FewShotDataModule"}}))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(named)])
    assert "is not a LightningModule" in capsys.readouterr().err
