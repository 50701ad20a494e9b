"""One CoOp training step at 10, 100 and 1,000 classes: plain vs vlprompt before vs vlprompt now,
on a random ViT-B-16-sized open_clip model.

- plain: as the reference code computes it: the full 77-token context for every class, and the
  image tower on every step;
- before: exact causal truncation and cached image features (vlprompt until the shared-prefix
  encoding);
- now: the same plus the shared-prefix encoding (the start token and unified context once, each
  class's suffix against the cached keys/values, suffixes grouped by length).

All variants run in this process on the same model, classes and batch; the script prints the
median step time of each, the ratios and the losses (equal up to float noise). ``plain`` at 1,000
classes needs about 30 GB for its activations and is skipped above ``--plain-max-classes``.
``--compile`` adds a fourth variant with ``compile_towers=True`` and states its compile time.

    python benchmarks/coop_step.py                          # 10, 100, 1000 classes, batch 32, CPU
    python benchmarks/coop_step.py --device cuda --precision bf16 --plain-max-classes 1000
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from timing import add_json_argument, peak_memory_mib, reset_peak_memory, timed, write_json
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.prompts import CoOpPromptLearner

log = logging.getLogger("benchmarks.coop_step")


def step(learner, backbone, images, labels, image_features, optimizer, autocast) -> float:
    with autocast():
        feats = image_features if image_features is not None else learner.encode_images(images)
        text = learner.text_features()
        logits = backbone.logit_scale * F.normalize(feats.float(), dim=-1) @ F.normalize(text.float(), dim=-1).t()
        loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-max-classes", type=int, default=100)
    parser.add_argument("--compile", action="store_true", help="also measure compile_towers=True")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    torch.manual_seed(0)

    now = OpenCLIPBackbone(args.model, pretrained=None).to(device)
    variants = {
        "plain": OpenCLIPBackbone.from_model(now.model, now.tokenizer, truncate_text=False, share_prefix=False),
        "before": OpenCLIPBackbone.from_model(now.model, now.tokenizer, share_prefix=False),
        "now": now,
    }
    if args.compile:
        # its own copy: compiling happens in place
        variants["now+compile"] = OpenCLIPBackbone.from_model(copy.deepcopy(now.model), now.tokenizer,
                                                              compile_towers=True)
    size = now.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    log.info("%s (random weights), batch %d, %d context tokens, %s on %s", args.model, args.batch_size, args.n_ctx,
             args.precision, device)
    rows, measured = [], []
    for classes in args.classes:
        names = list(IMAGENET_CLASSNAMES[:classes])
        labels = torch.randint(0, classes, (args.batch_size,), device=device)
        times, losses = {}, {}
        for name, backbone in variants.items():
            if name == "plain" and classes > args.plain_max_classes:
                continue
            torch.manual_seed(1)
            learner = CoOpPromptLearner(backbone, names, n_ctx=args.n_ctx).to(device)
            opt = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9)
            cached = None
            if name != "plain":
                with torch.no_grad(), autocast():
                    cached = learner.encode_images(images)  # computed once, reused every epoch
            reset_peak_memory(device)
            start = time.perf_counter()
            step(learner, backbone, images, labels, cached, opt, autocast)
            first = time.perf_counter() - start
            times[name], losses[name] = timed(lambda: step(learner, backbone, images, labels, cached, opt, autocast),
                                              args.repeats, device)
            measured.append({"classes": classes, "variant": name, "seconds": times[name], "loss": losses[name],
                             "first_step_seconds": first, "peak_mib": peak_memory_mib(device)})
            if name == "now+compile":
                log.info("  compile_towers at %d classes: first step %.1f s (compiling), then %.3f s/step",
                         classes, first, times[name])
            log.info("%5d classes  %-12s %8.3f s/step  loss %.5f", classes, name, times[name], losses[name])
        rows.append((classes, times))
    log.info("")
    log.info("classes  plain s/step  before s/step  now s/step  now vs plain  now vs before")
    for classes, t in rows:
        plain = f"{t['plain']:12.3f}" if "plain" in t else f"{'-':>12}"
        ratio = f"{t['plain'] / t['now']:11.1f}x" if "plain" in t else f"{'-':>12}"
        log.info("%7d %s %14.3f %11.3f %s %13.1fx", classes, plain, t["before"], t["now"], ratio, t["before"] / t["now"])
    write_json(args.json, "coop_step", device, {"model": args.model, "batch_size": args.batch_size, "n_ctx": args.n_ctx,
                                                "precision": args.precision}, measured)


if __name__ == "__main__":
    main()
