"""`vlprompt tta` on folders of images: TPT and DiffTPT, outputs, pictures, the view cache
command, and clear errors for bad folders."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from test_difftpt import tiny_unet

from vlprompt.apps.tta import run_tta
from vlprompt.data import TestImagesDataModule


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vlprompt"])  # LightningCLI must not read pytest's arguments


def _model(model_dir: Path, class_path: str = "vlprompt.methods.TestTimePromptTuning", **init_args) -> str:
    backbone = {"class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": {"model_name": f"local-dir:{model_dir}"}}
    return json.dumps({"class_path": class_path, "init_args": {"backbone": backbone, "n_views": 4, **init_args}})


def _run(model: str, images: Path, out: Path, *extra: str):
    return run_tta(["--model", model, "--images", str(images), "--out", str(out), "--trainer.accelerator=cpu",
                 "--trainer.enable_progress_bar=false", *extra])


@pytest.fixture()
def ddpm_dir(tmp_path) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path / "ddpm"
    DDPMPipeline(unet=tiny_unet(sample_size=32), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


def test_tpt_on_a_labelled_folder_writes_predictions_accuracy_and_pictures(tmp_path, tiny_model_dir, image_folder):
    (image_folder / "red_square" / "broken.png").write_bytes(b"not an image")
    summary = _run(_model(tiny_model_dir), image_folder, tmp_path / "out", "--pictures=2")
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert len(rows) == 41 and summary["predicted"] == 40
    broken = [r for r in rows if r["status"] != "ok"]
    assert [Path(r["path"]).name for r in broken] == ["broken.png"] and summary["skipped"] == [broken[0]["path"]]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(0 < float(r["confidence"]) <= 1 and r["prediction"] in summary["classnames"] for r in ok)
    assert summary["accuracy"] == pytest.approx(100 * sum(int(r["correct"]) for r in ok) / 40, abs=0.01)
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["summary"]["accuracy"] == summary["accuracy"]
    assert len(list((tmp_path / "out" / "views").glob("*.png"))) == 2
    with pytest.raises(FileExistsError, match="overwrite"):  # never overwrites earlier results
        _run(_model(tiny_model_dir), image_folder, tmp_path / "out")


def test_unlabelled_images_need_class_names_and_get_no_accuracy(tmp_path, tiny_model_dir, image_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(image_folder.rglob("*.png"))[:3]):
        shutil.copy(path, flat / f"{i}.png")
    with pytest.raises(ValueError, match="class names"):
        _run(_model(tiny_model_dir), flat, tmp_path / "out")
    (tmp_path / "classes.txt").write_text("red square\ngreen square\n\nblue square\n")
    summary = _run(_model(tiny_model_dir), flat, tmp_path / "out", f"--classnames_file={tmp_path / 'classes.txt'}",
                   "--pictures=0")
    assert summary["predicted"] == 3 and summary["labelled"] == 0 and "accuracy" not in summary
    assert summary["classnames"] == ["red square", "green square", "blue square"]


def test_difftpt_through_the_command_with_a_pregenerated_cache(tmp_path, tiny_model_dir, image_folder, ddpm_dir):
    generator = {"class_path": "vlprompt.tta.SDEditGenerator",
                 "init_args": {"model": str(ddpm_dir), "n_views": 2, "steps": 4, "strength": 0.5, "device": "cpu"}}
    model = _model(tiny_model_dir, "vlprompt.methods.DiffTPT", generator=generator, steps=1,
                   cache_dir=str(tmp_path / "cache"))
    _run(model, image_folder, tmp_path / "unused", "--generate_views_only=true")
    assert len(list((tmp_path / "cache").glob("*/*/settings.json"))) == 40
    summary = _run(model, image_folder, tmp_path / "out", "--pictures=1")
    assert summary["predicted"] == 40 and summary["method"] == "DiffTPT"
    assert not (tmp_path / "unused" / "predictions.csv").exists()
    assert len(list((tmp_path / "out" / "views").glob("*.png"))) == 1


def test_folder_errors_are_clear(tmp_path, image_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        TestImagesDataModule(str(empty), classnames=["a", "b"])
    with pytest.raises(FileNotFoundError, match="not found"):
        TestImagesDataModule(str(tmp_path / "missing"), classnames=["a"])
    with pytest.raises(ValueError, match="match none of the class names"):
        TestImagesDataModule(str(image_folder), classnames=["red square", "green square"])
    (image_folder / "purple_square").mkdir()  # an empty class folder is ignored, with a warning
    dm = TestImagesDataModule(str(image_folder))
    assert dm.classnames == ["blue square", "green square", "red square", "yellow square"] and dm.labelled
    with pytest.raises(ValueError, match="duplicate class names"):
        TestImagesDataModule(str(image_folder), classnames=["red square", "Red square", "green square", "blue square",
                                                             "yellow square"])


def test_tta_on_a_dataset_config_with_the_shipped_method_config(tmp_path, tiny_model_dir, dassl_folder):
    import yaml

    backbone = tmp_path / "backbone.yaml"
    backbone.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": {
        "class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": {"model_name": f"local-dir:{tiny_model_dir}"}}}}}))
    configs = Path(__file__).resolve().parents[1] / "configs"
    summary = run_tta(["--config", str(configs / "tta" / "tpt.yaml"), "--config", str(backbone),
                    "--model.init_args.n_views=4", "--data", "vlprompt.data.FewShotDataModule", f"--data.root={dassl_folder}",
                    "--data.num_workers=0", "--out", str(tmp_path / "out"), "--pictures=0", "--trainer.accelerator=cpu",
                    "--trainer.enable_progress_bar=false"])
    assert summary["predicted"] == summary["labelled"] == 24 and "accuracy" in summary
