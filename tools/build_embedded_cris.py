#!/usr/bin/env python
"""Build the embedded CRIS-shaped VLSM ``shapeworld-cris-tiny``: a tiny open_clip CLIP with a ResNet
image tower (``ModifiedResNet``, RN50's layout shrunk) and CRIS's head, on ShapeWorld, so that CRIS
segmenters run offline.

Two stages, both on procedural ShapeWorld data:

1. **Image tower.** A ResNet image tower (one bottleneck per stage, width 16, attention pool into
   the 64-wide joint space) is trained contrastively against the *frozen* text tower of
   ``shapeworld-clip-tiny`` on pretraining image-caption pairs. Borrowing the text tower keeps the
   shipped weights small (the model's folder names it in ``shared_towers.json`` instead of holding
   a 6 MB copy of its token embeddings) and gives text prompts the same text encoder as the ViT
   model's.
2. **CRIS head.** With that CLIP frozen, CRIS's head (:class:`vlprompt.seg.cris.CRISHead`: neck,
   2-layer vision-language decoder, projector) learns referring segmentation on ShapeWorld's clean
   scenes with the prompt text as it is (the zero-shot VLSM), as ``tools/build_embedded_vlsm.py``
   trains the CLIPSeg-style head.

Writes into ``vlprompt/zoo/shapeworld-cris-tiny``: ``open_clip_config.json``,
``open_clip_model.safetensors`` (the image tower and ``logit_scale``, fp16),
``shared_towers.json``, ``cris_head.safetensors`` and ``CRIS_BUILD.json`` (arguments, hashes,
versions, times, Dice/IoU on the clean, shifted and negative test splits).
``OpenCLIPBackbone("zoo:shapeworld-cris-tiny")`` loads the CLIP and
``PromptSegmenter(head="cris", decoder_weights="zoo:shapeworld-cris-tiny")`` the head.

Deterministic (seeded data and init, deterministic algorithms, fixed thread count): on the same
machine and software it reproduces the weights bit for bit, which ``--check`` verifies.

    nice python tools/build_embedded_cris.py          # about 10 minutes on a busy 2-core machine
    python tools/build_embedded_cris.py --check
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from vlprompt.backbones import OpenCLIPBackbone  # noqa: E402
from vlprompt.data import ShapeWorldSegmentationDataModule, world  # noqa: E402
from vlprompt.methods import PromptSegmenter  # noqa: E402
from vlprompt.methods.segmentation import save_decoder_weights  # noqa: E402
from vlprompt.zoo import CRIS_BUILD_FILE, CRIS_HEAD_FILE, SHARED_TOWERS_FILE, ZOO_DIR, model_dir, tensors_sha256  # noqa: E402

log = logging.getLogger("build_embedded_cris")

MODEL_NAME = "shapeworld-cris-tiny"
TEXT_FROM = "shapeworld-clip-tiny"
WEIGHTS_FILE = "open_clip_model.safetensors"


def model_config() -> dict[str, Any]:
    """The lender's text tower and joint width, a ResNet image tower at the same 64-pixel input."""
    lender = json.loads((model_dir(TEXT_FROM) / "open_clip_config.json").read_text())
    cfg = copy.deepcopy(lender["model_cfg"])
    cfg["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32}
    return {"model_cfg": cfg, "preprocess_cfg": lender["preprocess_cfg"]}


class CaptionedImages(Dataset):
    """ShapeWorld pretraining pair ``i`` (normalised image, token ids), drawn from ``seed``."""

    def __init__(self, length: int, seed: int, preprocess_cfg: dict[str, Any], context_length: int) -> None:
        self.length, self.seed, self.size = length, seed, preprocess_cfg["size"]
        self.tokenizer = open_clip.get_tokenizer("", context_length=context_length)
        self.mean = torch.tensor(preprocess_cfg["mean"]).view(3, 1, 1)
        self.std = torch.tensor(preprocess_cfg["std"]).view(3, 1, 1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, text, _ = world.pretraining_sample(index, self.seed, self.size)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std, self.tokenizer([text])[0]


def _with_lent_text(cfg: dict[str, Any], seed: int) -> open_clip.CLIP:
    """A new CLIP of ``cfg`` with the lender's text tower and temperature, the text tower frozen."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg["model_cfg"])
    lent = load_file(str(model_dir(TEXT_FROM) / WEIGHTS_FILE))
    text = {k: v.float() for k, v in lent.items() if not k.startswith("visual.")}
    missing, unexpected = model.load_state_dict(text, strict=False)
    if unexpected or any(not k.startswith("visual.") for k in missing):
        raise RuntimeError(f"the lender's text tower does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual.") or name == "logit_scale")
    return model


def align_image_tower(cfg: dict[str, Any], args: argparse.Namespace) -> tuple[open_clip.CLIP, float]:
    """Stage 1: the ResNet image tower trained contrastively against the frozen lent text tower."""
    model = _with_lent_text(cfg, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.align_lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    data = CaptionedImages(args.align_steps * args.align_batch, args.seed + 1, cfg["preprocess_cfg"],
                           cfg["model_cfg"]["text_cfg"]["context_length"])
    loader = DataLoader(data, batch_size=args.align_batch, shuffle=False, num_workers=0, drop_last=True)
    warmup = max(args.align_steps // 10, 1)
    model.train()
    smoothed = float("nan")
    for step, (images, tokens) in enumerate(loader):
        rate = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.align_steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = args.align_lr * rate
        with torch.no_grad():
            text = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * F.normalize(model.encode_image(images), dim=-1) @ text.T
        labels = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        smoothed = loss.item() if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            log.info("align step %d/%d  loss %.4f (smoothed %.4f)", step + 1, args.align_steps, loss.item(), smoothed)
    model.eval().requires_grad_(False)
    # What users load is fp16: the head is trained on the rounded weights.
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return model, smoothed


def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                         "enable_model_summary": False, "enable_checkpointing": False, "num_sanity_val_steps": 0,
                         "limit_val_batches": 0, "deterministic": True, **kwargs})


def train_head(model: open_clip.CLIP, args: argparse.Namespace, root: Path) -> tuple[PromptSegmenter, dict]:
    """Stage 2: CRIS's head on the frozen CLIP, clean scenes, the prompt text as it is; test scores."""
    pl.seed_everything(args.seed, workers=True)
    backbone = OpenCLIPBackbone.from_model(model, name=f"zoo:{MODEL_NAME}")
    data = {"batch_size": args.batch_size, "eval_batch_size": 128, "num_workers": 0}
    train = ShapeWorldSegmentationDataModule(str(root / "seg-clean"), domain="clean", augment=True, seed=args.seed,
                                             **data)
    options = {"num_layers": args.layers, "num_heads": args.heads, "dim_ffn": args.dim_ffn, "dropout": args.dropout}
    segmenter = PromptSegmenter(backbone, head="cris", head_options=options, train_decoder=True,
                                optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=1e-4))
    _trainer(max_epochs=args.epochs).fit(segmenter, datamodule=train)
    scores = {}
    for domain in ("clean", "shifted", "negative"):
        dm = ShapeWorldSegmentationDataModule(str(root / f"seg-{domain}"), domain=domain, **data)
        _trainer().test(segmenter, datamodule=dm, verbose=False)
        scores[domain] = {k: round(v, 4) for k, v in segmenter.test_results.items()}
    return segmenter, scores


def write_model(model: open_clip.CLIP, cfg: dict[str, Any], out: Path) -> Path:
    """The folder's own weights (image tower, ``logit_scale``; fp16), config and lender."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / SHARED_TOWERS_FILE).write_text(json.dumps({"text": TEXT_FROM}, indent=2) + "\n")
    own = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()
           if k.startswith("visual.") or k == "logit_scale"}
    path = out / WEIGHTS_FILE
    save_file(own, str(path), metadata={"format": "pt"})
    return path


def build(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cfg = model_config()
    model, align_loss = align_image_tower(cfg, args)
    aligned = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        segmenter, scores = train_head(model, args, Path(tmp))
    clip_path = write_model(model, cfg, out)
    head_path = save_decoder_weights(segmenter.decoder, out / CRIS_HEAD_FILE)
    record = {
        "model": MODEL_NAME, "head": "CRISHead", "text_tower_from": TEXT_FROM,
        "command": ["tools/build_embedded_cris.py"], "args": vars(args), "model_cfg": cfg["model_cfg"],
        "head_layout": segmenter.decoder.layout(),
        "tensors_sha256": {"clip": tensors_sha256(clip_path), "head": tensors_sha256(head_path)},
        "weights_sha256": {"clip": hashlib.sha256(clip_path.read_bytes()).hexdigest(),
                           "head": hashlib.sha256(head_path.read_bytes()).hexdigest()},
        "weights_bytes": {"clip": clip_path.stat().st_size, "head": head_path.stat().st_size},
        "align_final_loss": round(align_loss, 4),
        "seconds": {"align": round(aligned - started), "head": round(time.perf_counter() - aligned)},
        "test_scores": scores,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "lightning": pl.__version__,
                     "open_clip": open_clip.__version__},
    }
    (out / CRIS_BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log.info("written to %s; test scores %s", out, scores)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--align-steps", type=int, default=300)
    parser.add_argument("--align-batch", type=int, default=128)
    parser.add_argument("--align-lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (CRIS: 3)")
    parser.add_argument("--heads", type=int, default=4, help="decoder attention heads (CRIS: 8)")
    parser.add_argument("--dim-ffn", type=int, default=256, help="decoder feed-forward width (CRIS: 2048)")
    parser.add_argument("--dropout", type=float, default=0.1, help="decoder dropout (CRIS: 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared 2-core machine)")
    parser.add_argument("--out", type=Path, default=ZOO_DIR / MODEL_NAME)
    parser.add_argument("--check", action="store_true", help="rebuild elsewhere and compare the weight hashes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.use_deterministic_algorithms(True)
    if args.check:
        expected = json.loads((args.out / CRIS_BUILD_FILE).read_text())["tensors_sha256"]
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
