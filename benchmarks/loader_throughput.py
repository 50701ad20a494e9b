"""Is decoding the bottleneck? The training loader's throughput (JPEG decoding, random resized crop
and flip, collation) against the device's throughput on the same images.

Writes 640x480 JPEGs (photo-sized) into a temporary image folder and measures, in this run:

- loader: images per second of the few-shot data module's training loader (``augment=True``) with
  each ``--workers`` count, over whole epochs after one warm-up epoch;
- device, inference: images per second of the frozen image tower (what the feature bank and the
  image-feature cache run);
- device, training: images per second of a VPT-deep training step (visual prompts: the image tower
  runs forward and backward on every step, so every image must come from the loader).

A loader/device ratio under 1 means the device waits for the loader; more workers (or the
feature bank, for methods that leave the image tower alone) is then the remedy::

    python benchmarks/loader_throughput.py --device cuda --precision bf16 --workers 0 4 8
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from feature_bank_fill import _write_images
from timing import add_json_argument, random_open_clip, timed, write_json
from vlprompt.data import FewShotDataModule
from vlprompt.methods import prompt_logits
from vlprompt.prompts import VPTPromptLearner

log = logging.getLogger("benchmarks.loader_throughput")


def loader_images_per_second(root: Path, preprocess: dict, workers: int, batch_size: int, epochs: int) -> float:
    data = FewShotDataModule(str(root), format="imagefolder", shots=-1, augment=True, batch_size=batch_size,
                             num_workers=workers, fewshot_dir=str(root / "fewshot"))
    data.set_preprocess(preprocess)
    data.setup("fit")
    loader = data.train_dataloader()
    for _ in loader:  # warm-up: workers start, files enter the page cache
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            count += len(batch["label"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2, help="timed loader epochs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("vlprompt").setLevel(logging.WARNING)
    device = torch.device(args.device)
    backbone = random_open_clip(args.model, 224, device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    labels = torch.arange(args.batch_size, device=device) % 8

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def encode() -> None:
        with torch.no_grad(), autocast():
            backbone.encode_image(images)

    torch.manual_seed(0)
    learner = VPTPromptLearner(backbone, [f"class {i}" for i in range(8)], n_tokens=8, depth=backbone.vision_layers,
                               templates="photo").to(device)
    optimizer = torch.optim.SGD(learner.parameters(), lr=1e-3)

    def train_step() -> None:
        with autocast():
            loss = F.cross_entropy(prompt_logits(learner(images=images), backbone).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rows = []
    for name, fn in (("device inference", encode), ("device training (VPT-deep)", train_step)):
        seconds, _ = timed(fn, args.repeats, device)
        rows.append({"stage": name, "workers": None, "images_per_second": args.batch_size / seconds})
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _write_images(root, args.images)
        for workers in args.workers:
            rate = loader_images_per_second(root, backbone.preprocess_cfg, workers, args.batch_size, args.epochs)
            rows.append({"stage": "loader", "workers": workers, "images_per_second": rate})
    device_rates = {row["stage"]: row["images_per_second"] for row in rows if row["workers"] is None}
    log.info("%s (random weights) at 224 px, batch %d, %s on %s", args.model, args.batch_size, args.precision, device)
    log.info("%-28s %8s %10s %14s %14s", "stage", "workers", "images/s", "vs inference", "vs training")
    for row in rows:
        for stage, rate in device_rates.items():
            row[f"ratio_to_{'inference' if 'inference' in stage else 'training'}"] = row["images_per_second"] / rate
        log.info("%-28s %8s %10.0f %13.2fx %13.2fx", row["stage"], "-" if row["workers"] is None else row["workers"],
                 row["images_per_second"], row["ratio_to_inference"], row["ratio_to_training"])
    write_json(args.json, "loader_throughput", device, {"model": args.model, "batch_size": args.batch_size,
                                                        "images": "640x480 JPEG", "precision": args.precision}, rows)


if __name__ == "__main__":
    main()
