"""Segmentation under DDP (2 CPU processes, gloo): one training epoch runs, and the test scores
(Dice and IoU, per image and dataset-wide) equal one process's, every mask counted once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

pytest.importorskip("monai")

_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.data import ShapeWorldSegmentationDataModule
from vlprompt.methods import PromptSegmenter
from vlprompt.prompts import CoOpPromptLearner

model_dir, root, out = sys.argv[1:4]
torch.set_num_threads(1)
torch.manual_seed(0)
backbone = OpenCLIPBackbone(f"local-dir:{model_dir}")
dm = ShapeWorldSegmentationDataModule(root, domain="clean", batch_size=8, eval_batch_size=7, num_workers=0, augment=False)
torch.manual_seed(1)
model = PromptSegmenter(backbone, lambda b, c: CoOpPromptLearner(b, c, n_ctx=2), reduce_dim=16, n_heads=2,
                        train_decoder=True)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
trainer.fit(model, datamodule=dm)
metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
if trainer.is_global_zero:
    torch.save(model.state_dict(), out + ".pt")
    open(out, "w").write(json.dumps({k: float(v) for k, v in metrics.items()}))
"""


@pytest.mark.slow
def test_ddp_segmentation_scores_equal_one_process(tmp_path, tiny_model_dir):
    from vlprompt.data import ShapeWorldSegmentationDataModule, world

    world.write_segmentation_dataset(tmp_path / "seg", n_train=16, n_val=0, n_test=13, domain="clean")
    (tmp_path / "seg" / "shapeworld.json").write_text(json.dumps({"domain": "clean", "seed": 0, "task": "segmentation"}) + "\n")
    script = tmp_path / "ddp_seg.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "seg"), str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "m.json").read_text())

    from vlprompt.backbones import OpenCLIPBackbone
    from vlprompt.methods import PromptSegmenter
    from vlprompt.prompts import CoOpPromptLearner

    torch.manual_seed(0)
    backbone = OpenCLIPBackbone(f"local-dir:{tiny_model_dir}")
    model = PromptSegmenter(backbone, lambda b, c: CoOpPromptLearner(b, c, n_ctx=2), reduce_dim=16, n_heads=2,
                            train_decoder=True)
    model.load_state_dict(torch.load(tmp_path / "m.json.pt", weights_only=True))
    dm = ShapeWorldSegmentationDataModule(str(tmp_path / "seg"), domain="clean", eval_batch_size=7, num_workers=0,
                                          augment=False)
    single = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        model, datamodule=dm, verbose=False)[0]
    for key in ("test/dice_per_image", "test/iou_per_image", "test/dice_dataset", "test/iou_dataset"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
