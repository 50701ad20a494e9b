"""The feature bank under DDP (2 CPU processes, gloo): each process encodes its share of the views,
both read all of them, and training gives the prompt DDP training without the bank gives (to float32
rounding). The progress bar is on, as on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.data import FewShotDataModule
from vlprompt.methods import PromptClassifier
from vlprompt.prompts import CoOpPromptLearner

model_dir, data_dir, bank, out = sys.argv[1:5]
torch.set_num_threads(1)
torch.manual_seed(0)
backbone = OpenCLIPBackbone(f"local-dir:{model_dir}")
dm = FewShotDataModule(data_dir, shots=-1, num_workers=0, batch_size=4, augment_seed=0, fewshot_dir=data_dir + "/fs")
pl.seed_everything(0, verbose=False)
model = PromptClassifier(backbone, CoOpPromptLearner, dm.classnames, feature_bank=bank or None)
# With the progress bar on: it syncs epoch metrics on process 0 only, before the model's epoch-end
# hook gathers its unreadable-image counts (this used to deadlock).
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_progress_bar=True,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
trainer.fit(model, datamodule=dm)
encoded = model.feature_bank.encoded if model.feature_bank else 0
json.dump({"ctx": model.prompt_learner.ctx.tolist(), "encoded": encoded}, open(f"{out}.{trainer.global_rank}", "w"))
"""


def _run(tmp_path: Path, model_dir: Path, data: Path, bank: str, out: Path) -> list[dict]:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, str(script), str(model_dir), str(data), bank, str(out)], check=True, env=env,
                   cwd=tmp_path, timeout=300)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_ddp_training_with_the_bank(tmp_path, tiny_model_dir, dassl_folder):
    bank = tmp_path / "bank"
    with_bank = _run(tmp_path, tiny_model_dir, dassl_folder, str(bank), tmp_path / "with")
    without = _run(tmp_path, tiny_model_dir, dassl_folder, "", tmp_path / "without")
    assert with_bank[0]["ctx"] == with_bank[1]["ctx"]  # gradients were averaged: the same steps
    # The bank encodes in other batch shapes than a training step: float32 sums in another order
    # (~1e-7 relative per feature), grown over the SGD steps (as in test_feature_bank).
    ctx, expected = torch.tensor(with_bank[0]["ctx"]), torch.tensor(without[0]["ctx"])
    torch.testing.assert_close(ctx, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
    assert [r["encoded"] for r in with_bank] == [32, 32]  # 32 images x 2 epochs, split over 2 processes
    stored = 0
    for part in bank.rglob("part-*.safetensors"):
        with safe_open(str(part), "pt") as f:
            stored += len(f.keys())
    assert stored == 64
