#!/usr/bin/env python
"""Train the embedded vision-language segmentation head: a CLIPSeg-style decoder on the frozen
``shapeworld-clip-tiny``, so that the segmentation demo runs offline.

The decoder (:class:`vlprompt.seg.CLIPSegDecoder`) learns referring segmentation on ShapeWorld's
clean-domain scenes (two held-out objects per image; prompts are the class name or a description,
drawn at random) with the prompt text as it is: the zero-shot VLSM. Writes
``clipseg_decoder.safetensors`` and ``CLIPSEG_BUILD.json`` (arguments, weight hash, versions, time,
Dice/IoU on the clean and shifted test splits) next to the CLIP model, where
``PromptSegmenter(decoder_weights="zoo:shapeworld-clip-tiny")`` finds them.

Deterministic (seeded data and init, deterministic algorithms, fixed thread count): on the same
machine and software it reproduces the weights bit for bit, which ``--check`` verifies.

    python tools/build_embedded_vlsm.py            # about 10 minutes on 2 CPU cores
    python tools/build_embedded_vlsm.py --check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from vlprompt.backbones import OpenCLIPBackbone  # noqa: E402
from vlprompt.data import ShapeWorldSegmentationDataModule  # noqa: E402
from vlprompt.methods import PromptSegmenter  # noqa: E402
from vlprompt.methods.segmentation import save_decoder_weights  # noqa: E402
from vlprompt.zoo import DECODER_BUILD_FILE, DECODER_FILE, model_dir, tensors_sha256  # noqa: E402

log = logging.getLogger("build_embedded_vlsm")


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": True,
                         "enable_model_summary": False, "enable_checkpointing": False, "num_sanity_val_steps": 0,
                         "limit_val_batches": 0, "deterministic": True, **kwargs})


def _scores(model: PromptSegmenter, root: Path, domain: str, data: dict) -> dict[str, float]:
    dm = ShapeWorldSegmentationDataModule(str(root / f"seg-{domain}"), domain=domain, **data)
    _trainer(enable_progress_bar=False).test(model, datamodule=dm, verbose=False)
    return {k: round(v, 4) for k, v in model.test_results.items()}


def build(out: Path, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True)
    started = time.perf_counter()
    backbone = OpenCLIPBackbone("zoo:shapeworld-clip-tiny")
    data = {"batch_size": args.batch_size, "eval_batch_size": 128, "num_workers": 0}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = ShapeWorldSegmentationDataModule(str(root / "seg-clean"), domain="clean", augment=True, seed=args.seed,
                                                 **data)
        model = PromptSegmenter(backbone, train_decoder=True, reduce_dim=args.reduce_dim, n_heads=args.heads,
                                optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=1e-4))
        _trainer(max_epochs=args.epochs).fit(model, datamodule=train)
        scores = {domain: _scores(model, root, domain, data) for domain in ("clean", "shifted", "negative")}
    out.mkdir(parents=True, exist_ok=True)
    path = save_decoder_weights(model.decoder, out / DECODER_FILE)
    record = {
        "model": "shapeworld-clip-tiny", "head": "CLIPSegDecoder", "command": ["tools/build_embedded_vlsm.py"],
        "args": vars(args), "extract_layers": model.decoder.extract_layers,
        "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "tensors_sha256": tensors_sha256(path),
        "weights_bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - started), "test_scores": scores,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "lightning": pl.__version__},
    }
    (out / DECODER_BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log.info("decoder written to %s; test scores %s", path, scores)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--reduce-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=model_dir("shapeworld-clip-tiny"))
    parser.add_argument("--check", action="store_true", help="rebuild elsewhere and compare the weight hash")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.use_deterministic_algorithms(True)
    if args.check:
        expected = json.loads((args.out / DECODER_BUILD_FILE).read_text())["tensors_sha256"]
        with tempfile.TemporaryDirectory() as tmp:
            got = build(Path(tmp), argparse.Namespace(**{**vars(args), "check": False, "out": tmp}))
        same = got["tensors_sha256"] == expected  # the tensors: header metadata order varies
        log.info("rebuilt weights %s the shipped ones", "match" if same else "DIFFER from")
        raise SystemExit(0 if same else 1)
    out = Path(args.out).resolve()
    shown = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)
    build(out, argparse.Namespace(**{**vars(args), "out": shown}))


if __name__ == "__main__":
    main()
