"""The segmentation evaluation on the embedded default: the shipped head loads, zero-shot fails on
negatives, prompt tuning fixes it; table, raw scores and overlays are written."""

from __future__ import annotations

import csv

import pytest
import yaml

from vlprompt.apps.segmentation import SegmentationEvalConfig, run_segmentation_eval
from vlprompt.resources import bundled_dir

pytest.importorskip("monai")


@pytest.mark.slow
def test_demo_config_tunes_prompts_past_the_zero_shot_head(tmp_path):
    raw = yaml.safe_load((bundled_dir("configs") / "seg" / "shapeworld_demo.yaml").read_text())
    raw["segmentation"]["data"]["init_args"]["root"] = str(tmp_path / "seg")
    raw["segmentation"]["methods"] = {"coop": raw["segmentation"]["methods"]["coop"]}
    raw["segmentation"]["methods"]["coop"]["config"] = str(bundled_dir("configs") / "methods" / "coop.yaml")
    raw["segmentation"]["overlays"] = 2
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    rows = run_segmentation_eval(SegmentationEvalConfig.read(path), tmp_path / "out")
    assert rows["zero-shot"]["dice_dataset"] < 0.05  # the head read "red" where the negative shows cyan
    assert rows["coop"]["dice_dataset"] > 0.5 and rows["coop"]["iou_per_image"] > 0.4
    assert [r["method"] for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))] == ["zero-shot", "coop"]
    assert (tmp_path / "out" / "overlays.png").stat().st_size > 10_000
    assert "| coop |" in (tmp_path / "out" / "summary.md").read_text()
    with pytest.raises(FileExistsError):
        run_segmentation_eval(SegmentationEvalConfig.read(path), tmp_path / "out")


def test_config_errors_are_clear(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"segmentation": {"backbone": {}, "data": {}, "methods": {}, "colour": 1}}))
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        SegmentationEvalConfig.read(path)
    path.write_text(yaml.safe_dump({"tasks": {}}))
    with pytest.raises(ValueError, match="`segmentation:` section"):
        SegmentationEvalConfig.read(path)
