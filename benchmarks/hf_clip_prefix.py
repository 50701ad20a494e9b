"""Hugging Face CLIP text encoding with vs without the shared-prefix encoding: one CoOp text step
(forward, backward, SGD; image features cached, as CoOp trains) at 10, 100 and 1,000 classes on a
random ``transformers`` CLIPModel with ViT-B/16's text tower (512 wide, 12 layers, 77 tokens).

- plain: the full 77-token context for every class;
- truncated: exact causal truncation up to the longest EOT position (what ``HFCLIPBackbone`` did
  before it shared the text path with open_clip);
- prefix: the same plus the shared-prefix encoding (start token and unified context once, each
  class's suffix against the cached keys/values, suffixes grouped by length).

All variants run in this process on the same model, classes and batch; the script prints the median
step time of each, the ratios against ``truncated`` and the losses (equal up to float noise). On
a CPU shared with other work, pass ``--threads 1``: the prefix path runs many small operations,
which several threads waiting on each other for a busy core slow down far more than the plain path.

    python benchmarks/hf_clip_prefix.py                      # 10, 100, 1000 classes, CPU
    python benchmarks/hf_clip_prefix.py --threads 1 --classes 10 100   # a small shared CPU
    python benchmarks/hf_clip_prefix.py --device cuda --classes 100 1000 --json hf_prefix.json
"""

from __future__ import annotations

import argparse
import contextlib
import logging

import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from coop_step import step  # the same CoOp step, over cached image features
from timing import add_json_argument, peak_memory_mib, reset_peak_memory, timed, write_json
from vlprompt.backbones import HFCLIPBackbone
from vlprompt.prompts import CoOpPromptLearner

log = logging.getLogger("benchmarks.hf_clip_prefix")

VARIANTS = {"plain": {"truncate_text": False, "share_prefix": False},
            "truncated": {"share_prefix": False},
            "prefix": {}}


def random_hf_clip(device: torch.device) -> torch.nn.Module:
    """A random ``transformers`` CLIPModel with ViT-B/16's text tower and a tiny image tower (the
    step does not run it): nothing is downloaded."""
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                     "num_attention_heads": 8, "max_position_embeddings": 77},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=512)
    return transformers.CLIPModel(config).eval().to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-max-classes", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (0: its default)")
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = random_hf_clip(device)
    backbones = {name: HFCLIPBackbone.from_model(model, name="random ViT-B/16 text", **options)
                 for name, options in VARIANTS.items()}
    log.info("transformers CLIPModel, ViT-B/16 text tower (random weights), batch %d, %d context tokens, on %s",
             args.batch_size, args.n_ctx, device)
    rows, measured = [], []
    for classes in args.classes:
        names = list(IMAGENET_CLASSNAMES[:classes])
        g = torch.Generator().manual_seed(1)
        labels = torch.randint(0, classes, (args.batch_size,), generator=g).to(device)
        image_features = torch.randn(args.batch_size, backbones["prefix"].embed_dim, generator=g).to(device)
        times = {}
        for name, backbone in backbones.items():
            if name == "plain" and classes > args.plain_max_classes:
                continue
            torch.manual_seed(1)
            learner = CoOpPromptLearner(backbone, names, n_ctx=args.n_ctx).to(device)
            opt = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9)
            reset_peak_memory(device)
            times[name], loss = timed(lambda: step(learner, backbone, None, labels, image_features, opt, contextlib.nullcontext),
                                            args.repeats, device)
            measured.append({"classes": classes, "variant": name, "seconds": times[name], "loss": loss,
                             "peak_mib": peak_memory_mib(device)})
            log.info("%5d classes  %-10s %8.3f s/step  loss %.5f", classes, name, times[name], loss)
        rows.append((classes, times))
    log.info("")
    log.info("classes  plain s/step  truncated s/step  prefix s/step  prefix vs truncated  prefix vs plain")
    for classes, t in rows:
        plain = f"{t['plain']:12.3f}" if "plain" in t else f"{'-':>12}"
        vs_plain = f"{t['plain'] / t['prefix']:15.1f}x" if "plain" in t else f"{'-':>16}"
        log.info("%7d %s %17.3f %14.3f %19.1fx %s", classes, plain, t["truncated"], t["prefix"],
                 t["truncated"] / t["prefix"], vs_plain)
    write_json(args.json, "hf_clip_prefix", device, {"model": "transformers CLIP, ViT-B/16 text",
                                                      "batch_size": args.batch_size, "n_ctx": args.n_ctx,
                                                      "threads": torch.get_num_threads()}, measured)


if __name__ == "__main__":
    main()
