"""Multitask training under DDP (2 CPU processes, gloo): the task batch sampler survives Lightning's
distributed sampler, every training sample is visited, and per-task test scores are exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest

_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.data import FewShotDataModule, MultiTaskDataModule
from vlprompt.methods import MultiTaskPromptClassifier
from vlprompt.prompts import CoOpPromptLearner

model_dir, dassl, folder, sampling, out = sys.argv[1:6]
torch.set_num_threads(1)
torch.manual_seed(0)
backbone = OpenCLIPBackbone(f"local-dir:{model_dir}")
tasks = {"base": FewShotDataModule(dassl, shots=4, subset="base", num_workers=0, augment=False),
         "all": FewShotDataModule(folder, shots=3, num_workers=0, augment=False)}
dm = MultiTaskDataModule(tasks, sampling=sampling, batch_size=4, eval_batch_size=3, num_workers=0)
model = MultiTaskPromptClassifier(backbone, lambda b, c: CoOpPromptLearner(b, c, n_ctx=2), dm.classnames)

class Record(pl.Callback):
    seen = []
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append([batch["index"].tolist(), batch["task"].tolist()])

record = Record()
pl.seed_everything(0)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, callbacks=[record], num_sanity_val_steps=0,
                     limit_val_batches=0)
trainer.fit(model, datamodule=dm)
loader = trainer.train_dataloader
sampler = loader.batch_sampler
metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
json.dump({"batches": record.seen, "batch_sampler": type(sampler).__name__,
           "sampler": type(getattr(sampler, "sampler", None)).__name__,
           "metrics": {k: float(v) for k, v in metrics.items()}, "state": model.prompt_learner.ctx.tolist()},
          open(f"{out}.{trainer.global_rank}", "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["round_robin", "mixed"])
def test_multitask_ddp_shards_task_batches_and_scores_exactly(sampling, tmp_path, tiny_model_dir, dassl_folder, image_folder):
    script = tmp_path / "ddp_multitask.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(dassl_folder), str(image_folder), sampling,
                           str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.json.{r}").read_text()) for r in (0, 1)]
    n_train = 2 * 4 + 4 * 3
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"])  # equal steps: no rank waits forever
    seen = [i for r in ranks for batch, _ in r["batches"] for i in batch]
    assert set(seen) == set(range(n_train)) and len(seen) <= n_train + 1  # DistributedSampler pads by at most one
    assert ranks[0]["state"] == ranks[1]["state"]  # gradients were averaged
    if sampling == "round_robin":
        assert all(r["batch_sampler"] == "TaskBatchSampler" and r["sampler"] == "DistributedSampler" for r in ranks)
        for r in ranks:
            assert sum(len(set(tasks)) == 1 for _, tasks in r["batches"]) >= len(r["batches"]) - 1
    # Per-task test scores under DDP equal one process's (test images are split without padding).
    from vlprompt.backbones import OpenCLIPBackbone
    from vlprompt.data import FewShotDataModule, MultiTaskDataModule
    from vlprompt.methods import MultiTaskPromptClassifier
    from vlprompt.prompts import CoOpPromptLearner

    import torch

    torch.manual_seed(0)
    backbone = OpenCLIPBackbone(f"local-dir:{tiny_model_dir}")
    tasks = {"base": FewShotDataModule(str(dassl_folder), shots=4, subset="base", num_workers=0, augment=False),
             "all": FewShotDataModule(str(image_folder), shots=3, num_workers=0, augment=False)}
    dm = MultiTaskDataModule(tasks, eval_batch_size=3, num_workers=0)
    model = MultiTaskPromptClassifier(backbone, lambda b, c: CoOpPromptLearner(b, c, n_ctx=2), dm.classnames)
    with torch.no_grad():
        model.prompt_learner.ctx.copy_(torch.tensor(ranks[0]["state"]))
    single = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        model, datamodule=dm, verbose=False)[0]
    for key in ("test/acc", "test/base", "test/all"):
        assert ranks[0]["metrics"][key] == pytest.approx(single[key], abs=1e-6), key
