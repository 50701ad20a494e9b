"""What a new user meets on the command line: the overview, one-line errors, exit codes, the
prompt that is never overwritten, a fast `--help`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
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
    # The run's first line says it is loading PyTorch (seconds before anything else): then the error.
    lines = [line for line in done.stderr.splitlines() if not line.startswith("INFO vlprompt: fit: loading PyTorch")]
    assert done.returncode == 2 and lines[0].startswith("vlprompt fit: error:") and expected in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(lines) <= 3


def _one_line_error(capsys, argv, command="fit"):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and lines[0].startswith(f"vlprompt {command}: error: "), lines
    assert len(lines) <= 3 and not any("usage:" in line or "Traceback" in line for line in lines), lines
    return lines[0]


def _coop_args(tmp_path, model_dir, data):
    return ["fit", "--config", str(CONFIGS / "methods" / "coop.yaml"), "--config", str(_backbone_yaml(tmp_path, model_dir)),
            "--config", str(CONFIGS / "data" / "imagefolder.yaml"), f"--data.init_args.root={data}",
            "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path / 'logs'}"]


@pytest.mark.parametrize("case", ["value of the wrong type", "unknown option", "missing config file"])
def test_parse_errors_are_one_line_not_the_usage(case, capsys, tmp_path, tiny_model_dir, image_folder):
    args = _coop_args(tmp_path, tiny_model_dir, image_folder)
    extra, expected = {
        "value of the wrong type": (["--trainer.max_epochs", "two"], "--trainer.max_epochs: Expected a int. Got value: two"),
        "unknown option": (["--trainer.max_epoks_typo", "2"], "unrecognized arguments: --trainer.max_epoks_typo 2"),
        "missing config file": (["--config", str(tmp_path / "nope.yaml")], f"File does not exist: '{tmp_path / 'nope.yaml'}'"),
    }[case]
    line = _one_line_error(capsys, args + extra)
    assert expected in line
    assert not (tmp_path / "logs").exists()  # nothing ran


def test_checkpoint_paths_are_checked_before_anything_is_built(capsys, tmp_path, tiny_model_dir, image_folder):
    from vlprompt.prompts import CoOpPromptLearner, save_prompt
    from vlprompt.backbones import OpenCLIPBackbone

    save_prompt(CoOpPromptLearner(OpenCLIPBackbone(f"local-dir:{tiny_model_dir}"), ["a", "b"], n_ctx=2), tmp_path / "prompt")
    args = _coop_args(tmp_path, tiny_model_dir, image_folder)
    line = _one_line_error(capsys, args + ["--ckpt_path", str(tmp_path / "prompt")])
    assert f"is a saved prompt, not a checkpoint; start from it with --model.init_prompt {tmp_path / 'prompt'}" in line
    line = _one_line_error(capsys, args + ["--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert "missing.ckpt: no such checkpoint file" in line
    # A checkpoint folder given in a YAML is caught too, not only on the command line.
    (tmp_path / "run").mkdir()
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump({"ckpt_path": str(tmp_path / "run")}))
    line = _one_line_error(capsys, args + ["--config", str(tmp_path / "resume.yaml")])
    assert f"is a directory; pass the checkpoint file, e.g. {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in line
    assert not (tmp_path / "logs").exists()


def test_applications_errors_are_one_line_too(capsys, tmp_path):
    # An application that stops with SystemExit("message") and an argparse error.
    assert "--config 'nope': no such file" in _one_line_error(capsys, ["demo", "--config", "nope"], "demo")
    line = _one_line_error(capsys, ["classify", "--images", str(tmp_path)], "classify")
    assert "the following arguments are required: --prompt" in line


def test_debug_shows_the_original_exception(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("VLPROMPT_DEBUG", "1")
    args = _coop_args(tmp_path, tiny_model_dir, tmp_path / "nowhere")
    with pytest.raises(Exception) as raised:
        main(args)
    assert not isinstance(raised.value, SystemExit)
    assert "image folder not found" in "".join(str(e) for e in (raised.value, raised.value.__cause__) if e)


class ImageHolder:
    """Built by jsonargparse below: its constructor fails inside vlprompt (load_rgb), which raises
    from PIL's error."""

    def __init__(self, image: str) -> None:
        from vlprompt.data.images import load_rgb

        load_rgb(image)


def test_error_message_is_ours_not_the_summary_nor_the_library_error(tmp_path):
    from jsonargparse import ArgumentParser

    from vlprompt.cli import error_message

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--holder", type=ImageHolder | None)
    config = parser.parse_args(["--holder", json.dumps({"class_path": f"{__name__}.ImageHolder",
                                                         "init_args": {"image": str(tmp_path / "missing.png")}})])
    with pytest.raises(ValueError, match="Union subtypes") as raised:
        parser.instantiate(config)
    # jsonargparse's union summary wraps our UnreadableImageError, itself raised from PIL's FileNotFoundError.
    assert error_message(raised.value).startswith(f"cannot read image {tmp_path / 'missing.png'}: ")
    try:
        {}["name"]
    except KeyError as err:  # a bare KeyError says nothing without its type
        assert error_message(err) == "KeyError: 'name'"


def test_subcommands_import_only_what_they_need():
    # A fresh interpreter: what the package and `vlprompt tta --help` import.
    done = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        import vlprompt.methods as methods, vlprompt.tta as tta
        assert set(methods.__all__) == set(methods._EXPORTS) and set(tta.__all__) == set(tta._EXPORTS)
        methods.PromptClassifier
        classifier_only = "vlprompt.methods.tta" not in sys.modules and "vlprompt.tta.views" not in sys.modules
        from vlprompt.cli import main
        try:
            main(["tta", "--help"])
        except SystemExit as done:
            assert done.code in (0, None)
        [getattr(methods, name) for name in methods.__all__] + [getattr(tta, name) for name in tta.__all__]
        print("RESULT", classifier_only, "diffusers" in sys.modules)
        """)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--classnames CLASSNAMES [CLASSNAMES ...]" in done.stdout  # tta's own help, space-separated names
    assert done.stdout.strip().splitlines()[-1] == "RESULT True False"


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
