"""Filling the augmented feature bank: views decoded in the main process vs by loader workers.

Writes JPEG photos' worth of noise (640x480) into a temporary image folder (its training split
is what gets encoded), builds a random
open_clip model (no download) and times :meth:`FeatureBank.fill` for one epoch, alternating the
two settings so that both see the same machine state::

    python benchmarks/feature_bank_fill.py [--model ViT-S-32] [--images 512] [--workers 2] [--repeats 2] [--device cuda]

A training run fills with its data module's ``num_workers``. On CPU the image tower dominates;
on a GPU decoding does, and the workers matter more.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from timing import add_json_argument, write_json
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.data import FewShotDataModule
from vlprompt.methods.feature_bank import FeatureBank


def _write_images(root: Path, n: int, classes: int = 8) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((480, 640, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def _fill_seconds(root: Path, backbone: OpenCLIPBackbone, workers: int) -> tuple[int, float]:
    data = FewShotDataModule(str(root), format="imagefolder", shots=-1, augment=True, augment_seed=0,
                             num_workers=workers)
    data.set_preprocess(backbone.preprocess_cfg)
    data.setup("fit")
    with tempfile.TemporaryDirectory() as bank_dir:
        bank = FeatureBank(bank_dir, backbone.identity, num_workers=workers)
        start = time.perf_counter()
        encoded = bank.fill(data.dataset("train"), 0, backbone.encode_image, backbone.device)
        return encoded, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-S-32", help="open_clip model name (random weights)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = args.device
    backbone = OpenCLIPBackbone(args.model).to(device)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _write_images(root, args.images)
        times: dict[int, list[float]] = {0: [], args.workers: []}
        for _ in range(args.repeats):
            for workers in times:
                encoded, seconds = _fill_seconds(root, backbone, workers)
                times[workers].append(seconds)
    best = {w: min(t) for w, t in times.items()}
    print(f"{args.model} on {device}, {encoded} views of 640x480 JPEGs, best of {args.repeats}:")
    print(f"  main process only   {best[0]:7.2f} s  ({encoded / best[0]:6.1f} views/s)")
    print(f"  {args.workers} loader workers    {best[args.workers]:7.2f} s  ({encoded / best[args.workers]:6.1f} views/s)"
          f"  {best[0] / best[args.workers]:.2f}x")
    write_json(args.json, "feature_bank_fill", device, {"model": args.model, "images": "640x480 JPEG"},
               [{"workers": w, "seconds": best[w], "views": encoded, "views_per_second": encoded / best[w]}
                for w in best])


if __name__ == "__main__":
    main()
