"""What a new user meets on the command line: the overview, one-line errors, exit codes, the
prompt that is never overwritten, a fast `--help`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlprompt.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXE = shutil.which("vlprompt") or str(Path(sys.executable).parent / "vlprompt")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vlprompt"])


def _vlprompt(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "VLPROMPT_DEBUG"}
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def _backbone_yaml(tmp_path, model_dir):
    path = tmp_path / "backbone.yaml"
    path.write_text(yaml.safe_dump({"model": {"backbone": {
        "class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": {"model_name": f"local-dir:{model_dir}"}}}}))
    return path


def test_help_lists_every_command_without_importing_torch():
    done = subprocess.run([sys.executable, "-c", "import sys; from vlprompt.cli import main; main(['--help']); "
                           "print('torch' in sys.modules, 'lightning' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("fit", "test", "tta", "demo", "eval-fewshot", "classify"):
        assert f"\n  {command} " in done.stdout
    assert done.stdout.strip().endswith("False False")
    unknown = _vlprompt("fitt")
    assert unknown.returncode == 2 and "unknown command 'fitt'" in unknown.stderr


@pytest.mark.parametrize("case", ["missing data folder", "empty class folder", "bad model name", "checkpoint folder"])
def test_errors_are_one_line_of_our_own(case, tmp_path, tiny_model_dir, image_folder):
    args = ["fit", "--config", CONFIGS / "methods" / "coop.yaml", "--config", _backbone_yaml(tmp_path, tiny_model_dir),
            "--config", CONFIGS / "data" / "imagefolder.yaml", "--data.init_args.root", image_folder,
            "--trainer.accelerator", "cpu"]
    expected = {"missing data folder": "image folder not found", "empty class folder": "contains no images",
                "bad model name": "unknown open_clip model 'ViT-B-61'; did you mean ViT-B-16",
                "checkpoint folder": "is a directory; pass the checkpoint file"}[case]
    if case == "missing data folder":
        args[args.index(image_folder)] = tmp_path / "nowhere"
    elif case == "empty class folder":
        (image_folder / "purple_square").mkdir()
    elif case == "bad model name":
        args[3:5] = ["--model.backbone", "vlprompt.backbones.OpenCLIPBackbone", "--model.backbone.init_args.model_name",
                     "ViT-B-61"]
    else:
        args += ["--ckpt_path", tmp_path]
    done = _vlprompt(*args, cwd=tmp_path)
    ours = [line for line in done.stderr.splitlines() if line.startswith("vlprompt fit: error:")]
    assert done.returncode == 2 and len(ours) == 1 and expected in ours[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) < 8


def _fit(tmp_path, model_dir, data, *extra):
    main(["fit", "--config", str(CONFIGS / "methods" / "coop.yaml"), "--config", str(_backbone_yaml(tmp_path, model_dir)),
          "--data", "vlprompt.data.FewShotDataModule", f"--data.root={data}", "--data.shots=2", "--data.num_workers=0",
          "--data.batch_size=4", "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path / 'logs'}", *extra])


def test_an_existing_prompt_is_refused_before_training(tmp_path, tiny_model_dir, dassl_folder, capsys):
    target = tmp_path / "prompt"
    _fit(tmp_path, tiny_model_dir, dassl_folder, f"--save_prompt={target}")
    saved = (target / "prompt.safetensors").read_bytes()
    checkpoints = sorted((tmp_path / "logs").rglob("*.ckpt"))
    with pytest.raises(SystemExit):
        _fit(tmp_path, tiny_model_dir, dassl_folder, f"--save_prompt={target}")
    assert "--overwrite_prompt true" in capsys.readouterr().err
    assert sorted((tmp_path / "logs").rglob("*.ckpt")) == checkpoints  # nothing was trained
    assert (target / "prompt.safetensors").read_bytes() == saved
    _fit(tmp_path, tiny_model_dir, dassl_folder, f"--save_prompt={target}", "--overwrite_prompt=true")
    assert json.loads((target / "config.json").read_text())["method"] == "coop"


def test_tta_exits_zero_and_takes_space_separated_class_names(tmp_path, tiny_model_dir, image_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(image_folder.rglob("*.png"))[::10]):
        shutil.copy(path, flat / f"{i}.png")
    model = json.dumps({"class_path": "vlprompt.methods.TestTimePromptTuning", "init_args": {
        "backbone": {"class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": {"model_name": f"local-dir:{tiny_model_dir}"}},
        "n_views": 2}})
    done = _vlprompt("tta", "--model", model, "--images", flat, "--classnames", "red square", "green square", "blue",
                     "--out", tmp_path / "out", "--pictures", "0", "--trainer.accelerator", "cpu",
                     "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())["summary"]
    assert summary["classnames"] == ["red square", "green square", "blue"] and summary["predicted"] == 4


@pytest.mark.slow
def test_ddp_fit_on_two_processes_saves_the_prompt_once(tmp_path, tiny_model_dir, dassl_folder):
    from vlprompt.prompts import load_prompt

    done = _vlprompt("fit", "--config", CONFIGS / "methods" / "coop.yaml", "--config", _backbone_yaml(tmp_path, tiny_model_dir),
                     "--data", "vlprompt.data.FewShotDataModule", "--data.root", dassl_folder, "--data.shots", "2",
                     "--data.num_workers", "0", "--data.batch_size", "2", "--trainer.max_epochs", "2",
                     "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp_path / "logs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    prompts = sorted((tmp_path / "logs").rglob("prompt.safetensors"))
    assert len(prompts) == 1
    from vlprompt.backbones import OpenCLIPBackbone

    assert load_prompt(prompts[0].parent, OpenCLIPBackbone(f"local-dir:{tiny_model_dir}"), strict=False).name == "coop"
