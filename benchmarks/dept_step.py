"""One training step of DePT (8 soft tokens + a rank-7 update of the frozen prompt tokens: within
1% of CoOp's parameters) vs 16-token CoOp, text side (cached image features, as both train), on a
random ViT-B-16-sized open_clip model: median step time, the bytes autograd keeps for the backward
pass, and the parameter counts. Ratios are DePT over CoOp, measured in the same run.

    python benchmarks/dept_step.py                    # 100 classes, batch 32, CPU
    python benchmarks/dept_step.py --device cuda --classes 1000
"""

from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext

import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from coop_step import step
from timing import random_open_clip, timed
from vlprompt.prompts import CoOpPromptLearner, DePTPromptLearner

log = logging.getLogger("benchmarks.dept_step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("vlprompt").setLevel(logging.WARNING)
    device = torch.device(args.device)
    backbone = random_open_clip(args.model, 224, device)
    names = list(IMAGENET_CLASSNAMES[: args.classes])
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    features = torch.randn(args.batch_size, backbone.embed_dim, device=device)
    log.info("%s, %d classes, batch %d, %s, cached image features", args.model, args.classes, args.batch_size, device)
    log.info("%-26s %10s %8s %7s %10s %7s", "learner", "params", "s/step", "ratio", "saved MiB", "ratio")
    base = None
    for name, factory in (("CoOp (16 tokens)", lambda: CoOpPromptLearner(backbone, names, n_ctx=16)),
                          ("DePT (8 tokens, rank 7)", lambda: DePTPromptLearner(backbone, names, n_ctx=8))):
        torch.manual_seed(1)
        learner = factory().to(device)
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9)
        seconds, _ = timed(lambda: step(learner, backbone, None, labels, features, optimizer, nullcontext),
                           args.repeats, device)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            learner.text_features()
        mib = sum(saved.values()) / 2**20
        base = base or (seconds, mib)
        log.info("%-26s %10s %8.3f %6.2fx %10.1f %6.2fx", name, f"{learner.num_learnable_parameters():,}", seconds,
                 seconds / base[0], mib, mib / base[1])



if __name__ == "__main__":
    main()
