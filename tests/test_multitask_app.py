"""``vlprompt eval-multitask``: source tuning over seeds, the averaged source prompt, and the
comparison on target tasks, on tiny random encoders."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from vlprompt.apps.multitask import VARIANTS, load_multitask_config, run_multitask_eval
from vlprompt.cli import main
from vlprompt.prompts import read_prompt_tensors


def _config(tmp_path, tiny_model_dir, dassl_folder, image_folder):
    data = lambda root, **kw: {"class_path": "vlprompt.data.FewShotDataModule",  # noqa: E731
                               "init_args": {"root": str(root), "num_workers": 0, "batch_size": 4, "augment": False, **kw}}
    config = {
        "backbone": {"class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": {"model_name": f"local-dir:{tiny_model_dir}"}},
        "source": {"tasks": {"base": data(dassl_folder, subset="base"), "folder": data(image_folder)},
                   "shots": 2, "seeds": [1, 2], "data": {"batch_size": 4, "num_workers": 0, "sampling": "proportional"}},
        "targets": {"tasks": {"novel": data(dassl_folder, subset="novel"), "all": data(dassl_folder)},
                    "shots": [1], "seeds": [1], "data": {"batch_size": 4, "num_workers": 0}},
        "methods": {"coop": {"config": "methods/mvlpt_coop.yaml",
                             "model": {"prompt_learner": {"init_args": {"n_ctx": 2}}, "optimizer": {"init_args": {"lr": 0.05}}},
                             "trainer": {"max_epochs": 2}, "source_trainer": {"max_epochs": 1}}},
        "trainer": {"accelerator": "cpu"},
    }
    path = tmp_path / "multitask.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_source_prompts_are_averaged_and_every_variant_is_scored(tmp_path, tiny_model_dir, dassl_folder, image_folder):
    cfg = load_multitask_config(_config(tmp_path, tiny_model_dir, dassl_folder, image_folder))
    results = run_multitask_eval(cfg, tmp_path / "out")
    prompts = tmp_path / "out" / "prompts" / "coop"
    seeds = [read_prompt_tensors(prompts / f"source-seed{s}")["ctx"] for s in (1, 2)]
    assert not torch.equal(*seeds)
    assert torch.allclose(read_prompt_tensors(prompts / "source")["ctx"], (seeds[0] + seeds[1]) / 2, atol=1e-6)
    config = json.loads((prompts / "source" / "config.json").read_text())
    assert config["metadata"]["averaged_from"] == [str(prompts / "source-seed1"), str(prompts / "source-seed2")]
    assert config["classnames"] == ["red square", "green square"] + ["blue square", "green square", "red square", "yellow square"]
    got = {(r.setting, r.dataset) for r in results}
    assert got == {(v, t) for v in VARIANTS for t in ("novel", "all")}
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(rows) == len(results)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| coop | mvlpt-init |" in summary and "| coop | multitask |" in summary
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_multitask_eval(cfg, tmp_path / "out")


def test_bad_configs_are_one_line_errors(tmp_path, tiny_model_dir, dassl_folder, image_folder, capsys):
    path = _config(tmp_path, tiny_model_dir, dassl_folder, image_folder)
    raw = yaml.safe_load(path.read_text())
    raw["methods"]["coop"]["sauce"] = 1
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SystemExit):
        main(["eval-multitask", "--config", str(path), "--output-dir", str(tmp_path / "o")])
    assert "unknown keys: ['sauce']" in capsys.readouterr().err
    del raw["methods"]["coop"]["sauce"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SystemExit):
        main(["eval-multitask", "--config", str(path), "--methods", "vpt"])
    assert "not in the config" in capsys.readouterr().err
