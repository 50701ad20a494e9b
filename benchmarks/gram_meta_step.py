"""One GRAM meta-step (a batch of episodes: inner steps on each support set, the query loss,
backward into the meta-prompt and the regulator), first- vs second-order, on a random open_clip
model: median wall time, the bytes autograd keeps for the backward pass (counted once per storage;
the activation memory, measurable on CPU) and on CUDA the peak allocated memory.

For CoOp (text-only) the episode's image features come from the frozen tower once (cached, as the
meta-learner does); ``CoOp, images`` runs the image tower in every step instead, for comparison.
Ratios are against first-order CoOp with cached features, measured in the same run.

    python benchmarks/gram_meta_step.py                          # ViT-B-16, CPU
    python benchmarks/gram_meta_step.py --device cuda --episodes 8
"""

from __future__ import annotations

import argparse
import functools
import logging

import torch

from timing import add_json_argument, peak_memory_mib, random_open_clip, reset_peak_memory, timed, write_json
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.methods import GRAMMetaLearner
from vlprompt.prompts import CoOpPromptLearner, VPTPromptLearner

log = logging.getLogger("benchmarks.gram_meta_step")

WORDS = ["cat", "dog", "car", "tree", "house", "ship", "bird", "horse", "lamp", "chair", "boat", "cup"]


def _episodes(n: int, ways: int, shots: int, queries: int, size: int, images: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for e in range(n):
        names = [WORDS[(e + i) % len(WORDS)] + f" {e}" for i in range(2 * ways)]
        ep = {"support": torch.arange(ways * shots), "support_labels": torch.arange(ways).repeat_interleave(shots),
              "support_names": names[:ways], "query": torch.arange(ways * shots, ways * (shots + queries)),
              "query_labels": torch.arange(ways).repeat_interleave(queries), "query_names": names[ways:]}
        if images:
            ep["support_image"] = torch.randn(ways * shots, 3, size, size, generator=g)
            ep["query_image"] = torch.randn(ways * queries, 3, size, size, generator=g)
        out.append(ep)
    return out


def measure(backbone: OpenCLIPBackbone, factory, second_order: bool, images: bool, args, device) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = GRAMMetaLearner(backbone, factory, n_way=args.ways, inner_steps=args.inner_steps,
                            second_order=second_order).to(device)
    episodes = _episodes(args.episodes, args.ways, args.shots, args.queries, args.size, images)
    model.image_features = torch.randn(args.ways * (args.shots + args.queries), backbone.embed_dim, device=device)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step() -> None:
        saved.clear()
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.meta_loss(episodes)
        loss.backward()

    reset_peak_memory(device)
    seconds, _ = timed(step, args.repeats, device)
    peak = peak_memory_mib(device)
    return seconds, sum(saved.values()) / 2**20, float("nan") if peak is None else peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--episodes", type=int, default=4, help="episodes per meta-step")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("vlprompt").setLevel(logging.WARNING)
    device = torch.device(args.device)
    backbone = random_open_clip(args.model, args.size, device)
    log.info("%s at %d px, %s; %d episodes per step, %d-way %d-shot, %d queries per class, %d inner steps",
             args.model, args.size, device, args.episodes, args.ways, args.shots, args.queries, args.inner_steps)
    rows = [("CoOp (16 ctx), cached", functools.partial(CoOpPromptLearner, n_ctx=16), False),
            ("CoOp (16 ctx), images", functools.partial(CoOpPromptLearner, n_ctx=16), True),
            ("VPT-deep (8 tokens)", functools.partial(VPTPromptLearner, n_tokens=8, templates="photo"), True)]
    log.info("%-24s %-6s %9s %7s %11s %7s %13s", "learner", "order", "s/step", "ratio", "saved MiB", "ratio",
             "CUDA peak MiB")
    base, measured = None, []
    for name, factory, images in rows:
        for second in (False, True):
            seconds, saved, peak = measure(backbone, factory, second, images, args, device)
            base = base or (seconds, saved)
            log.info("%-24s %-6s %9.3f %6.2fx %11.1f %6.2fx %13.0f", name, "second" if second else "first", seconds,
                     seconds / base[0], saved, saved / base[1], peak)
            measured.append({"learner": name, "order": "second" if second else "first", "seconds": seconds,
                             "saved_mib": saved, "peak_mib": None if peak != peak else peak})
    write_json(args.json, "gram_meta_step", device, {"model": args.model, "size": args.size, "episodes": args.episodes,
                                                     "ways": args.ways, "shots": args.shots, "queries": args.queries,
                                                     "inner_steps": args.inner_steps}, measured)


if __name__ == "__main__":
    main()
