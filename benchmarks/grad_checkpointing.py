"""Memory of deep prompts on large towers, with and without gradient checkpointing.

MaPLe (deep prompts in 9 layers of both towers) on random-weight open_clip models, one forward and
backward pass. Measured: the bytes autograd keeps for the backward pass (tensors saved by the graph,
counted once per storage: the activation memory, measurable on CPU), wall time, and on CUDA the
peak allocated memory. Ratios are against the same model without checkpointing, in the same run.

    python benchmarks/grad_checkpointing.py --models ViT-L-14 ViT-H-14 --batch 2
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch

from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.methods import prompt_logits
from vlprompt.prompts import MaPLePromptLearner

CLASSES = ["cat", "dog", "car", "tree", "house", "ship", "bird", "horse"]


def measure(model_name: str, checkpointing: bool, batch: int, device: str) -> tuple[float, float, float]:
    torch.manual_seed(0)
    backbone = OpenCLIPBackbone(model_name, grad_checkpointing=checkpointing).to(device)
    learner = MaPLePromptLearner(backbone, CLASSES).to(device)
    size = backbone.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch, 3, size, size, device=device)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = prompt_logits(learner(images=images), backbone).logsumexp(-1).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return sum(saved.values()) / 2**20, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-L-14", "ViT-H-14"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"MaPLe depth 9, {len(CLASSES)} classes, batch {args.batch}, {args.device}; open_clip {open_clip.__version__}")
    print(f"{'model':<10} {'checkpointing':<13} {'saved MiB':>10} {'ratio':>6} {'seconds':>8} {'ratio':>6} {'CUDA peak MiB':>14}")
    for name in args.models:
        base = measure(name, False, args.batch, args.device)
        for flag, (mib, seconds, peak) in ((False, base), (True, measure(name, True, args.batch, args.device))):
            print(f"{name:<10} {str(flag):<13} {mib:10.0f} {mib / base[0]:6.2f} {seconds:8.1f} {seconds / base[1]:6.2f} {peak:14.0f}")


if __name__ == "__main__":
    main()
