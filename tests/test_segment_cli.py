"""``vlprompt segment``: masks and overlays at each image's size, one row per (image, prompt),
unreadable files counted, nothing overwritten, a prompt from another backbone refused."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from vlprompt.cli import main

pytest.importorskip("monai")


@pytest.fixture()
def head(backbone, tmp_path):
    import torch

    from vlprompt.methods import PromptSegmenter
    from vlprompt.methods.segmentation import save_decoder_weights

    torch.manual_seed(0)
    return save_decoder_weights(PromptSegmenter(backbone, train_decoder=True, reduce_dim=16, n_heads=2).decoder,
                                tmp_path / "head.safetensors")


def test_segment_writes_masks_overlays_and_refuses_to_overwrite(tmp_path, tiny_model_dir, head, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("wide.png", (48, 32)), ("small.jpg", (20, 30))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"nope")
    args = ["segment", "--images", str(folder), "--text", "red star", "a blue circle", "--out", str(tmp_path / "out"),
            "--backbone", f"local-dir:{tiny_model_dir}", "--decoder", str(head), "--device", "cpu"]
    main(args + ["--overwrite"])  # nothing there yet: --overwrite changes nothing
    rows = list(csv.DictReader(open(tmp_path / "out" / "segments.csv")))
    assert len(rows) == 6 and sum(r["status"] == "unreadable" for r in rows) == 2
    for row in rows:
        if row["status"] == "ok":
            source = Image.open(row["image"])
            mask, overlay = Image.open(row["mask"]), Image.open(row["overlay"])
            assert mask.size == overlay.size == source.size and mask.mode == "L"
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert (tmp_path / "out" / "masks" / "wide__a-blue-circle.png").is_file()
    before = (tmp_path / "out" / "segments.csv").read_bytes()
    with pytest.raises(SystemExit):
        main(args)
    assert "already holds segments.csv" in capsys.readouterr().err
    assert (tmp_path / "out" / "segments.csv").read_bytes() == before


def test_a_prompt_from_another_backbone_is_refused(tmp_path, tiny_model_dir, head, capsys):
    from conftest import TINY_CLIP, make_backbone

    from vlprompt.prompts import CoOpPromptLearner, save_prompt

    other = make_backbone(tmp_path / "other", TINY_CLIP, seed=1)
    save_prompt(CoOpPromptLearner(other, ["x"], n_ctx=2), tmp_path / "prompt")
    Image.new("RGB", (32, 32)).save(tmp_path / "one.png")
    with pytest.raises(SystemExit):
        main(["segment", "--images", str(tmp_path / "one.png"), "--text", "x", "--out", str(tmp_path / "o"),
              "--backbone", f"local-dir:{tiny_model_dir}", "--decoder", str(head), "--prompt", str(tmp_path / "prompt")])
    assert "different weights" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_and_test_run_segmentation_configs_and_segment_uses_the_saved_prompt(tmp_path):
    from vlprompt.resources import bundled_dir

    config = str(bundled_dir("configs") / "seg" / "shapeworld_coop.yaml")
    data = ["--data.init_args.root", str(tmp_path / "seg"), "--trainer.logger", "false"]
    main(["fit", "--config", config, *data, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
          "--model.init_args.train_decoder", "true", "--save_prompt", str(tmp_path / "prompt")])
    assert (tmp_path / "prompt" / "config.json").is_file() and (tmp_path / "prompt" / "decoder.safetensors").is_file()
    last = next((tmp_path / "run").rglob("last.ckpt"))
    main(["test", "--config", config, *data, "--ckpt_path", str(last), "--trainer.default_root_dir", str(tmp_path / "test")])
    images = sorted((tmp_path / "seg" / "images").glob("test_*.png"))[:2]
    main(["segment", "--images", *map(str, images), "--text", "red star", "--prompt", str(tmp_path / "prompt"),
          "--out", str(tmp_path / "out"), "--device", "cpu"])
    rows = list(csv.DictReader(open(tmp_path / "out" / "segments.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
