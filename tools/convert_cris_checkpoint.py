#!/usr/bin/env python
"""Convert CRIS's released checkpoint into an open_clip ``local-dir:`` folder and a vlprompt CRIS head
(:mod:`vlprompt.seg.cris_checkpoint`).

    python tools/convert_cris_checkpoint.py best_model.pth cris-rn50/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vlprompt.seg.cris_checkpoint import write_cris_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="CRIS's best_model.pth (or TuneVLSeg's cris_best_single.pth)")
    parser.add_argument("out", help="the folder to write")
    parser.add_argument("--num-heads", type=int, default=8, help="the decoder's attention heads (not in the weights)")
    parser.add_argument("--dropout", type=float, default=0.2, help="the decoder's dropout (not in the weights)")
    parser.add_argument("--head-width", type=int, default=64, help="the CLIP's attention head width (OpenAI's 64)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = write_cris_checkpoint(args.checkpoint, args.out, args.num_heads, args.dropout, args.head_width)
    logging.getLogger("convert_cris_checkpoint").info(
        "wrote %s: OpenCLIPBackbone('local-dir:%s'), PromptSegmenter(head='cris', decoder_weights='%s')",
        out, out, out / "cris_head.safetensors")


if __name__ == "__main__":
    main()
