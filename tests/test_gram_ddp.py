"""GRAM meta-training under DDP (2 CPU processes, gloo): the inner loop's gradients do not upset
DDP, each process draws its own share of the episodes, and meta-gradients are averaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.data import ImageTextPairsDataModule
from vlprompt.methods import GRAMMetaLearner
from vlprompt.prompts import CoOpPromptLearner

model_dir, pairs, out = sys.argv[1:4]
torch.set_num_threads(1)
torch.manual_seed(0)
backbone = OpenCLIPBackbone(f"local-dir:{model_dir}")
model = GRAMMetaLearner(backbone, lambda b, c: CoOpPromptLearner(b, c, n_ctx=2), n_way=3, k_shot=2, q_query=3,
                        n_domains=2, classes_per_domain=4, min_class_size=3, inner_steps=2, inner_lr=0.5)
dm = ImageTextPairsDataModule(pairs, episodes_per_epoch=8, episodes_per_batch=2, num_workers=0)

class Record(pl.Callback):
    seen = []
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen += [ep["support"].tolist() for ep in batch]

record = Record()
pl.seed_everything(0)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, callbacks=[record])
trainer.fit(model, datamodule=dm)
json.dump({"episodes": record.seen, "ctx": model.prompt_learner.ctx.tolist(),
           "regulator": [p.tolist() for p in model.regulator.parameters()]}, open(f"{out}.{trainer.global_rank}", "w"))
"""


@pytest.mark.slow
def test_gram_meta_training_under_ddp(tmp_path, tiny_model_dir):
    from vlprompt.data.world import write_caption_dataset

    pairs = write_caption_dataset(tmp_path / "pairs", 96, image_size=32)
    script = tmp_path / "ddp_gram.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(pairs), str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.json.{r}").read_text()) for r in (0, 1)]
    assert len(ranks[0]["episodes"]) == len(ranks[1]["episodes"]) == 4  # 8 episodes, half each
    assert not set(map(str, ranks[0]["episodes"])) & set(map(str, ranks[1]["episodes"]))
    assert ranks[0]["ctx"] == ranks[1]["ctx"] and ranks[0]["regulator"] == ranks[1]["regulator"]
