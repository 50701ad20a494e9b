"""Classifying images with a saved prompt, from Python and from `vlprompt classify`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlprompt.apps.classify import classify_images
from vlprompt.cli import main
from vlprompt.data.images import build_eval_transform, load_rgb
from vlprompt.prompts import CoCoOpPromptLearner, CoOpPromptLearner, load_prompt, save_prompt

NAMES = ["blue square", "green square", "red square", "yellow square"]
EXE = shutil.which("vlprompt") or str(Path(sys.executable).parent / "vlprompt")


def _learner(kind: str, backbone):
    torch.manual_seed(0)
    learner = {"coop": CoOpPromptLearner, "cocoop": CoCoOpPromptLearner}[kind](backbone, NAMES, n_ctx=2)
    with torch.no_grad():  # a prompt that is not the initial one, so it decides something
        for p in learner.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return learner


def _direct_probabilities(learner, backbone, paths) -> torch.Tensor:
    """CLIP's scoring written out here: logit scale x cosine of image and class text features."""
    transform = build_eval_transform(backbone.preprocess_cfg)
    images = torch.stack([transform(load_rgb(str(p))) for p in paths])
    with torch.no_grad():
        out = learner(images=images)
        image = F.normalize(out.image_features, dim=-1)
        text = F.normalize(out.text_features, dim=-1)
        cosine = torch.einsum("bd,bcd->bc", image, text) if text.dim() == 3 else image @ text.t()
        return (backbone.model.logit_scale.exp() * cosine).softmax(-1)


@pytest.mark.parametrize("kind", ["coop", "cocoop"])  # one classifier for all images, one per image
def test_predictions_are_the_argmax_of_the_logits(kind, backbone, image_folder, tmp_path):
    learner = _learner(kind, backbone)
    save_prompt(learner, tmp_path / "prompt")
    (image_folder / "red_square" / "broken.png").write_bytes(b"not an image")
    predictions = classify_images(tmp_path / "prompt", image_folder, backbone=backbone, batch_size=7, device="cpu")
    ok = [p for p in predictions if p.status == "ok"]
    assert len(predictions) == 41 and len(ok) == 40
    assert [Path(p.path).name for p in predictions if p.status == "unreadable"] == ["broken.png"]
    probs = _direct_probabilities(learner, backbone, [p.path for p in ok])
    assert probs.std(0).max() > 1e-2  # images score differently, so matching them can fail
    assert [p.index for p in ok] == probs.argmax(-1).tolist()
    assert [p.label for p in ok] == [NAMES[i] for i in probs.argmax(-1).tolist()]
    assert torch.allclose(torch.tensor([p.probability for p in ok]), probs.max(-1).values, atol=1e-5)
    for p, row in zip(ok, probs):
        assert [name for name, _ in p.top] == [NAMES[i] for i in row.argsort(descending=True).tolist()]
        assert sum(v for _, v in p.top) == pytest.approx(1.0, abs=1e-5)  # 4 classes: the top 5 is all of them


def test_in_memory_images_and_a_learner_left_as_it_was(backbone, image_folder):
    learner = _learner("coop", backbone).train()
    paths = sorted((image_folder / "blue_square").glob("*.png"))[:2]
    greens = sorted((image_folder / "green_square").glob("*.png"))
    predictions = classify_images(learner, [Image.open(paths[0]), paths[1], image_folder / "green_square"],
                                  classnames=["blue", "not blue"], device="cpu", top_k=1)
    assert [p.path for p in predictions] == ["<image 0>", str(paths[1])] + [str(p) for p in greens]
    assert all(p.status == "ok" and len(p.top) == 1 for p in predictions)
    # The caller's learner keeps its class names and its mode.
    assert learner.classnames == NAMES and learner.training
    learner.set_classnames(["blue", "not blue"])
    probs = _direct_probabilities(learner.eval(), backbone, [paths[0], paths[1], *greens])
    assert [p.label for p in predictions] == [["blue", "not blue"][i] for i in probs.argmax(-1).tolist()]
    assert [p.probability for p in predictions] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)
    with pytest.raises(FileNotFoundError, match="no such image or folder"):
        classify_images(learner, [paths[0], image_folder / "nope.png"], device="cpu")
    with pytest.raises(ValueError, match="brings its own backbone"):
        classify_images(learner, paths, backbone=object(), device="cpu")


def test_load_prompt_rebuilds_the_recorded_backbone(backbone, tmp_path):
    from vlprompt.backbones import BackboneMismatchError, OpenCLIPBackbone

    zoo = OpenCLIPBackbone("zoo:shapeworld-clip-tiny")
    save_prompt(_learner("coop", zoo), tmp_path / "zoo")
    loaded = load_prompt(tmp_path / "zoo")  # no backbone: rebuilt from config.json, offline
    assert loaded.backbone.identity == zoo.identity
    assert torch.equal(loaded.ctx, _learner("coop", zoo).ctx)
    # A random local model cannot be rebuilt with the same weights: refused, not silently wrong.
    save_prompt(_learner("coop", backbone), tmp_path / "random")
    with pytest.raises(BackboneMismatchError, match="different weights"):
        load_prompt(tmp_path / "random")


def test_command_classifies_a_folder_and_never_overwrites(image_folder, tmp_path):
    from vlprompt.backbones import OpenCLIPBackbone

    zoo = OpenCLIPBackbone("zoo:shapeworld-clip-tiny")
    learner = _learner("coop", zoo)
    save_prompt(learner, tmp_path / "prompt")
    (image_folder / "red_square" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "VLPROMPT_DEBUG"}
    done = subprocess.run([EXE, "classify", "--prompt", str(tmp_path / "prompt"), "--images", str(image_folder),
                           "--out", str(out), "--device", "cpu", "--batch_size", "16"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))
    document = json.loads((out / "predictions.json").read_text())
    assert len(rows) == len(document["predictions"]) == 41
    assert [Path(r["path"]).name for r in rows if r["status"] == "unreadable"] == ["broken.png"]
    assert document["summary"]["unreadable"] == [str(image_folder / "red_square" / "broken.png")]
    assert document["summary"]["classnames"] == NAMES and document["summary"]["classified"] == 40
    ok = [r for r in rows if r["status"] == "ok"]
    probs = _direct_probabilities(learner, zoo, [r["path"] for r in ok])
    assert [r["label"] for r in ok] == [NAMES[i] for i in probs.argmax(-1).tolist()]
    assert [float(r["probability"]) for r in ok] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)

    # Earlier predictions are never replaced without --overwrite, and nothing is computed first.
    before = (out / "predictions.csv").read_bytes()
    with pytest.raises(SystemExit):
        main(["classify", "--prompt", str(tmp_path / "prompt"), "--images", str(image_folder), "--out", str(out)])
    assert (out / "predictions.csv").read_bytes() == before
    # --classnames: other classes, space-separated.
    main(["classify", "--prompt", str(tmp_path / "prompt"), "--images", str(image_folder / "red_square"),
          "--classnames", "red square", "something else", "--out", str(out), "--overwrite", "--device", "cpu"])
    document = json.loads((out / "predictions.json").read_text())
    assert document["summary"]["classnames"] == ["red square", "something else"]
    assert {p["label"] for p in document["predictions"] if p["status"] == "ok"} <= {"red square", "something else"}
    assert len(document["predictions"]) == 11
