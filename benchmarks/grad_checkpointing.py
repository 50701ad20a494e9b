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

from timing import add_json_argument, peak_memory_mib, reset_peak_memory, write_json
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.methods import prompt_logits
from vlprompt.prompts import MaPLePromptLearner

CLASSES = ["cat", "dog", "car", "tree", "house", "ship", "bird", "horse"]


def measure(backbone: OpenCLIPBackbone, batch: int, device: str) -> tuple[float, float, float | None]:
    """Saved-tensor MiB, seconds and CUDA peak MiB of one MaPLe forward and backward pass."""
    torch.manual_seed(0)
    learner = MaPLePromptLearner(backbone, CLASSES).to(device)
    size = backbone.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch, 3, size, size, device=device)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    reset_peak_memory(device)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = prompt_logits(learner(images=images), backbone).logsumexp(-1).mean()
    loss.backward()
    peak = peak_memory_mib(device)
    return sum(saved.values()) / 2**20, time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-L-14", "ViT-H-14"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_json_argument(parser)
    args = parser.parse_args()
    print(f"MaPLe depth 9, {len(CLASSES)} classes, batch {args.batch}, {args.device}; open_clip {open_clip.__version__}")
    print(f"{'model':<10} {'checkpointing':<13} {'saved MiB':>10} {'ratio':>6} {'seconds':>8} {'ratio':>6} {'CUDA peak MiB':>14}")
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        plain = OpenCLIPBackbone(name).to(args.device)
        base = measure(plain, args.batch, args.device)
        # the same weights, checkpointed (the flag is set on the shared model: measured second)
        checkpointed = OpenCLIPBackbone.from_model(plain.model, plain.tokenizer, name=name, grad_checkpointing=True)
        for flag, (mib, seconds, peak) in ((False, base), (True, measure(checkpointed, args.batch, args.device))):
            shown = float("nan") if peak is None else peak
            print(f"{name:<10} {str(flag):<13} {mib:10.0f} {mib / base[0]:6.2f} {seconds:8.1f} {seconds / base[1]:6.2f} {shown:14.0f}")
            rows.append({"model": name, "checkpointing": flag, "saved_mib": mib, "seconds": seconds, "peak_mib": peak})
        del plain, checkpointed
    write_json(args.json, "grad_checkpointing", args.device, {"learner": "maple", "batch": args.batch}, rows)


if __name__ == "__main__":
    main()
