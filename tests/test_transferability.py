"""``vlprompt transferability``: the task x task matrix, its heat map and the proposed groups."""

from __future__ import annotations

import csv

import pytest
import yaml

from vlprompt.apps.transferability import load_transferability_config, run_transferability, task_groups


def test_groups_are_tasks_that_help_each_other_both_ways():
    gain = {"a": {"a": 9, "b": 3, "c": 5, "d": 0}, "b": {"a": 2, "b": 9, "c": -1, "d": 0},
            "c": {"a": 4, "b": 8, "c": 9, "d": 0}, "d": {"a": 5, "b": 5, "c": 5, "d": 9}}
    # a<->b and a<->c help both ways (b->c does not, but b and c meet through a); d helps all, none helps d.
    assert task_groups(gain, threshold=1.0) == [["a", "b", "c"], ["d"]]
    assert task_groups(gain, threshold=2.5) == [["a", "c"], ["b"], ["d"]]


@pytest.mark.parametrize("finetune", [False, True])
def test_study_writes_matrix_heat_map_and_groups(finetune, tmp_path, tiny_model_dir, dassl_folder, image_folder):
    data = lambda root, **kw: {"class_path": "vlprompt.data.FewShotDataModule",  # noqa: E731
                               "init_args": {"root": str(root), "num_workers": 0, "batch_size": 4, "augment": False, **kw}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "backbone": {"class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": {"model_name": f"local-dir:{tiny_model_dir}"}},
        "tasks": {"base": data(dassl_folder, subset="base"), "novel": data(dassl_folder, subset="novel"), "folder": data(image_folder)},
        "method": {"config": "methods/coop.yaml", "model": {"prompt_learner": {"init_args": {"n_ctx": 2}},
                                                              "optimizer": {"init_args": {"lr": 0.05}}},
                   "trainer": {"max_epochs": 2}},
        "shots": 2, "finetune": finetune, "target_shots": 1, "threshold": -100.0, "trainer": {"accelerator": "cpu"},
    }, sort_keys=False))
    study = run_transferability(load_transferability_config(path), tmp_path / "out")
    names = ["base", "novel", "folder"]
    assert list(study.accuracy) == names and all(list(row) == names for row in study.accuracy.values())
    for s in names:
        for t in names:
            assert study.gain[s][t] == pytest.approx(study.accuracy[s][t] - study.baseline[t])
    rows = list(csv.reader(open(tmp_path / "out" / "gain.csv")))
    assert rows[0] == ["source \\ target", *names] and [r[0] for r in rows[1:]] == names
    assert float(rows[2][3]) == pytest.approx(study.gain["novel"]["folder"], abs=0.01)
    assert (tmp_path / "out" / "transfer.png").stat().st_size > 1000
    assert study.groups == [names]  # every gain is above a threshold of -100 points
    assert "- base, novel, folder" in (tmp_path / "out" / "groups.md").read_text()
    with pytest.raises(FileExistsError):
        run_transferability(load_transferability_config(path), tmp_path / "out")
