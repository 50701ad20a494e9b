"""The embedded diffusion model and the test-time tuning demo on the embedded default."""

from __future__ import annotations

import copy
import csv
import sys

import numpy as np
import pytest
import yaml

from vlprompt.resources import bundled_dir
from vlprompt.tta import SDEditGenerator
from vlprompt.zoo import diffusion_model_dir
from vlprompt.data.world import CLASSNAMES, class_spec, render, sample_spec


def _shifted(index: int):
    rng = np.random.default_rng([7, index])
    return render(sample_spec(rng, combos=[class_spec(CLASSNAMES[index])]), rng, domain="shifted")


def test_embedded_diffusion_model_ships_and_sdedit_keeps_the_scene():
    weights = diffusion_model_dir("shapeworld-ddpm-tiny") / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 8 * 2**20
    generator = SDEditGenerator("zoo:shapeworld-ddpm-tiny", n_views=2, steps=10, strength=0.3, device="cpu")
    a, b = _shifted(0), _shifted(5)
    views = generator.generate([a])[0]
    pixels = [np.asarray(v, dtype=np.float32) for v in views]
    same = np.abs(pixels[0] - np.asarray(a, dtype=np.float32)).mean()
    other = np.abs(pixels[0] - np.asarray(b, dtype=np.float32)).mean()
    assert same < 0.5 * other  # a light edit of this image, not a new one
    assert np.abs(pixels[0] - pixels[1]).mean() > 0.5  # and the views differ


@pytest.mark.slow
def test_tta_demo_prints_zero_shot_tpt_and_difftpt_and_reuses_its_view_cache(tmp_path, monkeypatch):
    from vlprompt.apps.compare_tta import compare_tta, format_comparison

    monkeypatch.setattr(sys, "argv", ["vlprompt"])
    path = bundled_dir("configs") / "eval" / "shapeworld_tta.yaml"
    config = copy.deepcopy(yaml.safe_load(path.read_text())["tta"])
    config["data"]["init_args"] |= {"test_per_class": 1, "root": str(tmp_path / "shifted")}
    difftpt = config["methods"]["difftpt"]["model"]["init_args"]
    difftpt["cache_dir"] = str(tmp_path / "views")
    difftpt["generator"]["init_args"]["n_views"] = 8
    config["trainer"]["enable_progress_bar"] = False
    summaries = compare_tta(config, tmp_path / "run1", path.parent)
    table = format_comparison(summaries)
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["zero-shot", "tpt", "difftpt"]
    assert summaries["tpt"]["start_accuracy"] == summaries["difftpt"]["start_accuracy"]  # same starting prompt
    for name, summary in summaries.items():  # the reported accuracy is that of the written predictions
        rows = list(csv.DictReader((tmp_path / "run1" / name / "predictions.csv").open()))
        assert summary["predicted"] == len(rows) == 16
        assert summary["accuracy"] == pytest.approx(100 * sum(int(r["correct"]) for r in rows) / 16, abs=0.01)
    assert len(list((tmp_path / "run1" / "difftpt" / "views").glob("*.png"))) == config["pictures"]
    assert len(list((tmp_path / "views").glob("*/*/settings.json"))) == 16
    assert summaries["difftpt"]["view_cache"]["generated"] == 16
    again = compare_tta({**config, "methods": {"difftpt": config["methods"]["difftpt"]}}, tmp_path / "run2", path.parent)
    assert again["difftpt"]["view_cache"]["generated"] == 0  # every view read back from the cache
    assert again["difftpt"]["accuracy"] == summaries["difftpt"]["accuracy"]
