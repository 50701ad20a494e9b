"""Evaluation under DDP (2 CPU processes, gloo) is exact: every test image counted once, none padded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from conftest import COLOURS, write_image
from vlprompt.data import FewShotDataModule
from vlprompt.methods import PromptClassifier
from vlprompt.prompts import CoOpPromptLearner, save_prompt

_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.data import FewShotDataModule
from vlprompt.methods import PromptClassifier

model_dir, data_dir, prompt_dir, out = sys.argv[1:5]
torch.set_num_threads(1)
torch.manual_seed(0)  # the same random tiny encoder as the test's
backbone = OpenCLIPBackbone(f"local-dir:{model_dir}")
dm = FewShotDataModule(data_dir, shots=2, num_workers=0, eval_batch_size=4)
from vlprompt.prompts import load_prompt
model = PromptClassifier(backbone, lambda b, c: load_prompt(prompt_dir, b, classnames=c), dm.classnames)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)
metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
if trainer.is_global_zero:
    open(out, "w").write(json.dumps({k: float(v) for k, v in metrics.items()}))
"""


@pytest.mark.slow
def test_ddp_test_metrics_count_every_image_once(tmp_path, tiny_model_dir):
    # 15 test images: 2 processes would get 8 each with a padded duplicate.
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    split = {"train": [], "val": [], "test": []}
    names = list(COLOURS)[:3]
    for label, name in enumerate(names):
        for s, n in (("train", 2), ("val", 1), ("test", 5)):
            for i in range(n):
                rel = f"{name.replace(' ', '_')}/{s}_{i}.png"
                write_image(root / "images" / rel, COLOURS[name], rng)
                split[s].append([rel, label, name])
    (root / "split_zhou_Colours.json").write_text(json.dumps(split))
    from vlprompt.backbones import OpenCLIPBackbone

    torch.manual_seed(0)
    backbone = OpenCLIPBackbone(f"local-dir:{tiny_model_dir}")
    learner = CoOpPromptLearner(backbone, names, n_ctx=2)
    with torch.no_grad():
        learner.ctx.normal_()
    save_prompt(learner, tmp_path / "prompt")
    dm = FewShotDataModule(str(root), shots=2, num_workers=0, eval_batch_size=4)
    single = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        PromptClassifier(backbone, lambda b, c: learner, names), datamodule=dm, verbose=False)[0]

    script = tmp_path / "ddp_test.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(root), str(tmp_path / "prompt"),
                           str(tmp_path / "metrics.json")], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "metrics.json").read_text())
    assert ddp["test/images"] == single["test/images"] == 15
    assert ddp["test/acc"] == pytest.approx(single["test/acc"])
    assert ddp["test/acc_per_class_mean"] == pytest.approx(single["test/acc_per_class_mean"])
