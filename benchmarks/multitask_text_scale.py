"""Multitask prompt tuning at scale: one CoOp training step over the union of classes of many tasks
(2,191 for the 11 standard few-shot datasets), with the text tower running over all of them.

Configurations, each in its own subprocess on the same random-weight model, classes and batch:

- ``plain``: the full context (77 tokens for CLIP) for every class, everything kept for backward;
- ``truncated``: vlprompt's exact causal truncation (text only up to the longest EOT position);
- ``chunked``: truncation + ``text_chunk_size`` (each chunk truncated to its own length) +
  gradient checkpointing, so the backward pass keeps one chunk's activations at a time.

One step is CoOp (16 context tokens, class name in the middle) over all classes, cross-entropy of
32 random image features against them (the image tower is not part of the step: CoOp caches
image features), backward, SGD. Printed per class count: seconds per step (median), the peak
memory the step adds on top of the loaded model (peak RSS growth on CPU, read from
``/proc/self/status`` after resetting it, with glibc's mmap threshold fixed so that RSS follows the
live tensors; ``torch.cuda.max_memory_allocated`` growth on CUDA), the
first step's loss (the same in every configuration: all three are exact) and ratios against the
first configuration of ``--configs`` that ran at that class count (``plain`` by default; named in
the last column).

    python benchmarks/multitask_text_scale.py --device cuda         # ViT-B-16, 100 1000 2191 classes
    python benchmarks/multitask_text_scale.py --threads 1 --repeats 1 --memory-limit-gb 12   # small shared CPU
    python benchmarks/multitask_text_scale.py --classes 100 1000 --configs truncated chunked

On a CPU, ViT-B-16's text tower (the image tower does not matter here) takes about 20 MiB per class
at full context and 6 per class truncated for the backward pass, and minutes per step at 2,191
classes: pass fewer ``--classes`` or leave ``plain`` out of ``--configs``, and keep
``--memory-limit-gb`` (CPU only) so that a configuration that does not fit reports "out of memory"
instead of pushing the machine into swap.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time

import open_clip
import torch
import torch.nn.functional as F

from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.prompts import CoOpPromptLearner

log = logging.getLogger("benchmarks.multitask_text_scale")

CONFIGS = ("plain", "truncated", "chunked")


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(args: argparse.Namespace, config: str, num_classes: int) -> dict[str, float]:
    """Time and peak memory of one CoOp step over ``num_classes`` classes in ``config``."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = OpenCLIPBackbone(
        args.model,
        pretrained=None,
        truncate_text=config != "plain",  # the learner builds its token buffers at this length
        grad_checkpointing=config == "chunked",
        text_chunk_size=args.chunk if config == "chunked" else None,
    ).to(device)
    names = [f"class {i} thing" for i in range(num_classes)]
    torch.manual_seed(1)
    learner = CoOpPromptLearner(backbone, names, n_ctx=args.n_ctx, class_token_position="middle").to(device)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    image_features = F.normalize(torch.randn(args.batch_size, backbone.embed_dim, generator=g), dim=-1).to(device)
    labels = torch.randint(0, num_classes, (args.batch_size,), generator=g).to(device)

    def step() -> float:
        text = F.normalize(learner.text_features(), dim=-1)
        loss = F.cross_entropy(backbone.logit_scale * image_features @ text.t(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        if args.memory_limit_gb:  # fail with "out of memory" instead of pushing the machine into swap
            limit = _proc_status_kib("VmSize") * 1024 + int(args.memory_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _proc_status_kib("VmRSS") * 1024
    losses, times = [], []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status_kib("VmHWM") * 1024
    return {
        "seconds": sorted(times)[len(times) // 2],
        "peak_mib": (peak - before) / 2**20,
        "loss": losses[0],
        "context": backbone.text_length_needed(learner.token_ids),
    }


def run_isolated(args: argparse.Namespace, config: str, num_classes: int) -> dict[str, float] | str:
    """:func:`measure` in a fresh process, so that each peak is its own; an error message on failure."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", config, str(num_classes)]
    # glibc raises its mmap threshold as large blocks are freed, then keeps freed activations in the
    # heap: peak RSS would grow with every chunk recomputed although live tensors do not. A fixed
    # threshold returns large tensors to the system when freed, so RSS follows the tensors.
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    if "can't allocate memory" in done.stderr or "out of memory" in done.stderr.lower() or done.returncode == -9:
        return "out of memory"
    log.error("%s, %d classes failed:\n%s", config, num_classes, done.stderr[-2000:])
    return f"failed (exit {done.returncode})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights, no download)")
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 2191])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="configurations to run; ratios are against the first that runs")
    parser.add_argument("--chunk", type=int, default=256, help="text_chunk_size of the chunked configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (their memory counts)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default); 1 on a machine shared with other work, where "
                             "threads waiting for a busy core make every small operation slow")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0,
                        help="CPU: address space a configuration may add before it counts as out of memory (0: none)")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "CLASSES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that random models have no weights
        print(json.dumps(measure(args, args.worker[0], int(args.worker[1]))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    memory = "CUDA peak allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"{args.model} (random weights), CoOp {args.n_ctx} ctx middle, batch {args.batch_size}, chunk {args.chunk}, "
          f"{args.device}, {torch.get_num_threads()} thread(s); open_clip {open_clip.__version__}, torch "
          f"{torch.__version__}; memory: {memory}")
    print(f"{'classes':>7} {'config':<10} {'context':>7} {'s/step':>8} {'ratio':>6} {'peak MiB':>9} {'ratio':>6} "
          f"{'loss':>9}  ratios vs", flush=True)
    for num_classes in args.classes:
        base, base_config = None, ""
        for config in args.configs:
            result = run_isolated(args, config, num_classes)
            if isinstance(result, str):
                print(f"{num_classes:>7} {config:<10} {result}", flush=True)
                continue
            if base is None:
                base, base_config = result, config
            print(f"{num_classes:>7} {config:<10} {result['context']:>7} {result['seconds']:8.2f} "
                  f"{result['seconds'] / base['seconds']:6.2f} {result['peak_mib']:9.0f} "
                  f"{result['peak_mib'] / base['peak_mib']:6.2f} {result['loss']:9.5f}  {base_config}", flush=True)


if __name__ == "__main__":
    main()
