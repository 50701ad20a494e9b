"""A whole few-shot sweep (3 text-side methods x 5 shot counts x 3 seeds), plain vs vlprompt.

plain: as the reference code computes it: the full 77-token text context, and the image tower
run on every training step (random resized crop + flip) and for every test. vlprompt: exact text
truncation, the shared-prefix text encoding, cached test features and the augmented feature bank
(each image's view of each epoch encoded once for the whole sweep). Both run the same sweep
through ``vlprompt.apps.fewshot`` on the same random open_clip model and ShapeWorld data (16
classes, 32 training images each), in this process; the script prints the wall time of each, the
ratio, and how many images went through the image tower for training. Both sweeps see the same
views, draws and initialisations and compute the same features up to float rounding; the mean
accuracies are printed for reference only (with random weights they sit near chance, where
rounding flips predictions).

    python benchmarks/fewshot_sweep.py                   # ViT-B-32 at 64 px, 5 epochs per run
    python benchmarks/fewshot_sweep.py --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import open_clip
from safetensors import safe_open

from vlprompt.apps.fewshot import EvaluationConfig, run_fewshot_eval
from vlprompt.data.world import write_classification_dataset

log = logging.getLogger("benchmarks.fewshot_sweep")

METHODS = ("coop", "kgcoop", "dept")


def model_dir(name: str, size: int, root: Path) -> Path:
    cfg = open_clip.get_model_config(name)
    cfg["vision_cfg"]["image_size"] = size
    folder = root / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return folder


def sweep(plain: bool, model: Path, data: Path, out: Path, bank: Path | None, args) -> tuple[float, list]:
    backbone_args = {"model_name": f"local-dir:{model}"}
    if plain:
        backbone_args.update(truncate_text=False, share_prefix=False)
    model_overrides = {"cache_image_features": not plain}
    cfg = EvaluationConfig(
        backbone={"class_path": "vlprompt.backbones.OpenCLIPBackbone", "init_args": backbone_args},
        data={"class_path": "vlprompt.data.FewShotDataModule",
              "init_args": {"root": str(data), "format": "dassl", "batch_size": 32, "eval_batch_size": 256,
                            "num_workers": 0, "augment_seed": 0, "crop_scale": [0.5, 1.0],
                            "fewshot_dir": str(out / "fewshot")}},
        methods={m: {"config": f"methods/{m}.yaml", "model": model_overrides,
                     "trainer": {"max_epochs": args.epochs}} for m in METHODS},
        shots=[1, 2, 4, 8, 16], seeds=[1, 2, 3], zeroshot=None, base_to_novel=None,
        trainer={"accelerator": args.device, "precision": args.precision},
        feature_bank=str(bank) if bank else None,
    )
    start = time.perf_counter()
    results = run_fewshot_eval(cfg, out / ("plain" if plain else "vlprompt"))
    return time.perf_counter() - start, results


def stored_views(bank: Path) -> int:
    count = 0
    for part in bank.rglob("part-*.safetensors"):
        with safe_open(str(part), "pt") as f:
            count += len(f.keys())
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "vlprompt", "root"):  # "root": open_clip's random-weights warning
        logging.getLogger(name).setLevel(logging.ERROR)
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")

    root = Path(tempfile.mkdtemp(prefix="vlprompt-sweep-"))
    data = write_classification_dataset(root / "data", n_train_per_class=32, n_val_per_class=4, n_test_per_class=16)
    model = model_dir(args.model, args.image_size, root)
    bank = root / "bank"
    runs = len(METHODS) * 5 * 3
    log.info("%s at %d px (random weights), %d runs of %d epochs, ShapeWorld 16 classes, %s, %s", args.model,
             args.image_size, runs, args.epochs, args.device, args.precision)
    fast_time, fast = sweep(False, model, data, root, bank, args)
    log.info("vlprompt: %.1f s", fast_time)
    plain_time, slow = sweep(True, model, data, root, None, args)
    log.info("plain:    %.1f s", plain_time)

    train_images = sum(16 * shots for shots in (1, 2, 4, 8, 16)) * len(METHODS) * 3  # images per epoch, all runs
    log.info("sweep wall time: plain %.1f s, vlprompt %.1f s: %.1fx faster", plain_time, fast_time, plain_time / fast_time)
    log.info("image-tower passes for training: plain %d, with the feature bank %d (%.1fx fewer)",
             train_images * args.epochs, stored_views(bank), train_images * args.epochs / max(1, stored_views(bank)))
    mean = lambda results: sum(r.accuracy for r in results) / len(results)  # noqa: E731
    log.info("mean test accuracy over the runs: plain %.2f%%, vlprompt %.2f%%", mean(slow), mean(fast))


if __name__ == "__main__":
    main()
