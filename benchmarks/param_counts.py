"""Learnable parameters of every prompt learner at ViT-B/16, next to the figures in the papers.

Builds a randomly initialised open_clip ViT-B-16 (no download) and each learner with the
paper's settings, and prints its learnable-parameter count::

    python benchmarks/param_counts.py [--model ViT-B-16]
"""

from __future__ import annotations

import argparse
import logging

from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.prompts import PROMPT_LEARNERS

# (learner, settings, the figure its paper gives at ViT-B/16, or None where we quote none)
PAPER_SETTINGS = [
    ("coop", {"n_ctx": 16}, 8_192),
    ("cocoop", {}, 35_360),
    ("vpt", {"n_tokens": 8, "depth": 12}, 73_728),
    ("ivlp", {}, 46_080),
    ("maple", {}, 3_555_072),
    ("promptsrc", {"templates": "photo"}, None),
    ("kgcoop", {}, None),
    ("upt", {}, None),
    ("dept", {"n_ctx": 8}, None),  # budget: within 1% of 16-token CoOp (rank 7)
    # decoupled DePT: CoOp + 4 x 512 channel scales/shifts + a 512 x 10-class linear head
    ("decoupled_dept", {"learner_args": {"n_ctx": 16}}, None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    backbone = OpenCLIPBackbone(args.model)
    classnames = [f"class {i}" for i in range(10)]
    print(f"{args.model}: text width {backbone.text_width}, vision width {backbone.vision_width}, "
          f"{backbone.text_layers}/{backbone.vision_layers} layers")
    print(f"{'method':<15} {'settings':<34} {'vlprompt':>11} {'paper':>11}")
    mismatches = 0
    for name, settings, paper in PAPER_SETTINGS:
        count = PROMPT_LEARNERS[name](backbone, classnames, **settings).num_learnable_parameters()
        expected = "-" if paper is None else f"{paper:,}"
        mark = "" if paper is None or paper == count else "  MISMATCH"
        mismatches += bool(mark)
        shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
        print(f"{name:<15} {shown:<34} {count:>11,} {expected:>11}{mark}")
    if mismatches:
        raise SystemExit(f"{mismatches} counts differ from the papers")


if __name__ == "__main__":
    main()
