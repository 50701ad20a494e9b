"""Classifying images with a saved prompt, from Python and from `vlprompt classify`."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from vlprompt.apps.classify import classify_images, main
from vlprompt.data.images import build_eval_transform, load_rgb
from vlprompt.methods import prompt_logits
from vlprompt.prompts import CoOpPromptLearner, save_prompt

NAMES = ["blue square", "green square", "red square", "yellow square"]


@pytest.fixture()
def saved(backbone, tmp_path):
    torch.manual_seed(0)
    learner = CoOpPromptLearner(backbone, NAMES, n_ctx=2)
    with torch.no_grad():
        learner.ctx.normal_()
    save_prompt(learner, tmp_path / "prompt")
    return learner, tmp_path / "prompt"


def test_predictions_are_the_argmax_of_the_method_logits(saved, backbone, image_folder):
    learner, path = saved
    (image_folder / "red_square" / "broken.png").write_bytes(b"not an image")
    predictions = classify_images(path, image_folder, backbone=backbone, batch_size=7, device="cpu")
    ok = [p for p in predictions if p.status == "ok"]
    assert len(ok) == 40 and [p.status for p in predictions].count("unreadable") == 1
    transform = build_eval_transform(backbone.preprocess_cfg)
    images = torch.stack([transform(load_rgb(p.path)) for p in ok])
    with torch.no_grad():
        probs = prompt_logits(learner(images=images), backbone).softmax(-1)
    assert [p.index for p in ok] == probs.argmax(-1).tolist()
    assert [p.label for p in ok] == [NAMES[i] for i in probs.argmax(-1).tolist()]
    assert torch.allclose(torch.tensor([p.probability for p in ok]), probs.max(-1).values, atol=1e-5)
    assert all(len(p.top) == 4 and p.top[0] == (p.label, pytest.approx(p.probability, abs=1e-4)) for p in ok)


def test_command_writes_predictions_for_new_classes_and_never_overwrites(saved, backbone, image_folder, tmp_path, monkeypatch):
    _, path = saved
    import vlprompt.prompts.io as io

    monkeypatch.setattr(io, "backbone_from_identity", lambda identity: backbone)  # the tiny model is not a zoo model
    out = tmp_path / "out"
    main(["--prompt", str(path), "--images", str(image_folder / "red_square"), "--classnames", "red", "not red",
          "--out", str(out), "--device", "cpu"])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 10 and {r["label"] for r in rows} <= {"red", "not red"}
    assert len(json.loads((out / "predictions.json").read_text())) == 10
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--prompt", str(path), "--images", str(image_folder), "--out", str(out)])
