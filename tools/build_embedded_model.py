#!/usr/bin/env python
"""Pretrain the embedded ``shapeworld-clip-tiny`` open_clip model on procedural ShapeWorld data.

Trains a tiny open_clip ``CLIP`` (standard layout, standard BPE tokenizer) contrastively on
image-caption pairs from :mod:`vlprompt.data.world`, generated on the fly from seeded generators and
never showing the 16 held-out (colour, shape) combinations. Writes an open_clip ``local-dir:``
folder (``open_clip_config.json``, fp16 ``open_clip_model.safetensors``) and ``BUILD.json`` with the
build arguments, weight hash, versions, timing, final loss, and zero-shot / 16-shot linear-probe
accuracy on the held-out classes.

The build is deterministic (seeded data and init, ``torch.use_deterministic_algorithms``, fixed
thread count): on the same machine and software it reproduces the weights bit for bit, which
``--check`` verifies.

Usage::

    python tools/build_embedded_model.py                   # full build into vlprompt/zoo/...
    python tools/build_embedded_model.py --check           # rebuild, compare sha256 with BUILD.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import math
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vlprompt.data import world  # noqa: E402

log = logging.getLogger("build_embedded_model")

MODEL_NAME = "shapeworld-clip-tiny"
DEFAULT_OUT = REPO / "vlprompt" / "zoo" / MODEL_NAME
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
BUILD_FILE = "BUILD.json"

MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 96, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}
PREPROCESS_CFG: dict[str, Any] = {
    "size": 64,
    "mean": list(OPENAI_DATASET_MEAN),
    "std": list(OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
ZERO_SHOT_TEMPLATE = "a photo of a {}."

DEFAULTS: dict[str, Any] = {
    "steps": 1600,
    "batch_size": 128,
    "seed": 0,
    "lr": 1.5e-3,
    "weight_decay": 0.1,
    "warmup": 100,
    "threads": 2,
    "workers": 0,
}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
class PretrainingData(Dataset):
    """Sample ``i`` = ShapeWorld pretraining example ``i`` (image tensor, token ids)."""

    def __init__(self, length: int, seed: int, image_size: int, context_length: int) -> None:
        self.length = length
        self.seed = seed
        self.image_size = image_size
        self.tokenizer = open_clip.get_tokenizer("", context_length=context_length)
        self.mean = torch.tensor(PREPROCESS_CFG["mean"]).view(3, 1, 1)
        self.std = torch.tensor(PREPROCESS_CFG["std"]).view(3, 1, 1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, text, _ = world.pretraining_sample(index, self.seed, self.image_size)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std, self.tokenizer([text])[0]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Deterministic single-machine execution; restores the global torch settings afterwards."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = (
            p.ndim < 2
            or "token_embedding" in name
            or "positional_embedding" in name
            or "class_embedding" in name
            or "logit_scale" in name
            or ".ln" in name
            or name.startswith("ln")
            or "bn" in name
        )
        (no_decay if exclude else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train(
    *,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup: int = DEFAULTS["warmup"],
    workers: int = 0,
    model_cfg: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[open_clip.CLIP, float]:
    """Train the tiny CLIP; returns the model (fp32, eval mode) and the final smoothed loss."""
    cfg = copy.deepcopy(model_cfg or MODEL_CFG)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = min(warmup, max(steps // 10, 1))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(steps - warmup, 1)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    data = PretrainingData(steps * batch_size, seed, cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"])
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=True,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="pretrain", unit="step", dynamic_ncols=True, mininterval=2.0)
    smoothed = float("nan")
    for step, (images, tokens) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
        loss = _clip_loss(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        value = loss.detach().item()
        smoothed = value if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * value
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.3f}", scale=f"{model.logit_scale.detach().exp().item():.1f}", refresh=False)
        if (step + 1) % 250 == 0 or step + 1 == steps:
            log.info("step %d/%d  loss %.4f (smoothed %.4f)  lr %.2e", step + 1, steps, value, smoothed, lr_at(step))
    if bar is not None:
        bar.close()
    return model.eval(), smoothed


def save_model_dir(model: torch.nn.Module, out_dir: Path, model_cfg: dict[str, Any] | None = None) -> str:
    """Write config and fp16 safetensors; returns the sha256 of the weights file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": copy.deepcopy(model_cfg or MODEL_CFG), "preprocess_cfg": dict(PREPROCESS_CFG)}
    (out_dir / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = out_dir / WEIGHTS_FILE
    save_file(state, str(path), metadata={"format": "pt"})
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def _load_split(root: Path, preprocess: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from PIL import Image

    split = json.loads((root / world.SPLIT_FILE).read_text(encoding="utf-8"))
    out = {}
    for name, items in split.items():
        images = torch.stack([preprocess(Image.open(root / "images" / rel).convert("RGB")) for rel, _, _ in items])
        out[name] = (images, torch.tensor([label for _, label, _ in items]))
    return out


@torch.no_grad()
def _image_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.normalize(model.encode_image(b), dim=-1) for b in images.split(256)])


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, steps: int = 300, weight_decay: float = 1e-3) -> float:
    """Multinomial logistic regression (full-batch Adam) on frozen features; test accuracy."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(train_x.shape[1], num_classes, generator=gen) * 0.01).requires_grad_()
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    scale = 10.0  # features are unit-norm; a fixed temperature speeds up convergence
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(scale * train_x @ w + b, train_y) + weight_decay * (w**2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((scale * test_x @ w + b).argmax(-1) == test_y).float().mean())


@torch.no_grad()
def evaluate(model_dir: Path, data_root: Path, shots: int = 16) -> dict[str, float]:
    """Zero-shot ("a photo of a {}.") and ``shots``-shot linear-probe accuracy on the held-out classes,
    with the model loaded back through open_clip's ``local-dir:`` path (as users will)."""
    name = f"local-dir:{model_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    data = _load_split(data_root, preprocess)

    test_images, test_y = data["test"]
    test_x = _image_features(model, test_images)
    prompts = [ZERO_SHOT_TEMPLATE.format(c) for c in world.CLASSNAMES]
    text = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    zero_shot = float(((test_x @ text.T).argmax(-1) == test_y).float().mean())
    # Same model, the pretraining-style caption "a {classname}" (diagnostic only).
    text_plain = F.normalize(model.encode_text(tokenizer([f"a {c}" for c in world.CLASSNAMES])), dim=-1)
    zero_shot_plain = float(((test_x @ text_plain.T).argmax(-1) == test_y).float().mean())

    train_images, train_y = data["train"]
    keep = torch.cat([torch.nonzero(train_y == c).flatten()[:shots] for c in range(len(world.CLASSNAMES))])
    train_x = _image_features(model, train_images[keep])
    with torch.enable_grad():
        probe = linear_probe(train_x, train_y[keep], test_x, test_y, len(world.CLASSNAMES))
    return {
        "zero_shot_acc": round(zero_shot, 4),
        "zero_shot_plain_template_acc": round(zero_shot_plain, 4),
        f"linear_probe_{shots}shot_acc": round(probe, 4),
        "n_test": int(test_y.numel()),
        "chance": round(1 / len(world.CLASSNAMES), 4),
    }


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
def build(
    out_dir: str | Path,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = DEFAULTS["seed"],
    *,
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup: int = DEFAULTS["warmup"],
    threads: int = DEFAULTS["threads"],
    workers: int = DEFAULTS["workers"],
    evaluate_model: bool = True,
    progress: bool = True,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Train, save and (optionally) evaluate the embedded model into ``out_dir``; returns BUILD.json."""
    out_dir = Path(out_dir)
    args = {"steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "weight_decay": weight_decay,
            "warmup": warmup, "threads": threads, "workers": workers}
    log.info("Building %s into %s with %s", MODEL_NAME, out_dir, args)
    start = time.perf_counter()
    with _deterministic(threads):
        model, final_loss = train(steps=steps, batch_size=batch_size, seed=seed, lr=lr,
                                  weight_decay=weight_decay, warmup=warmup, workers=workers, progress=progress)
        train_seconds = time.perf_counter() - start
        sha = save_model_dir(model, out_dir)
        log.info("Trained in %.0f s, final loss %.4f, weights sha256 %s", train_seconds, final_loss, sha)
        metrics: dict[str, Any] = {}
        if evaluate_model:
            with tempfile.TemporaryDirectory() as tmp:
                # The demo's downstream task: negatives of the held-out classes (see world.py).
                root = world.write_classification_dataset(Path(tmp) / "shapeworld", seed=seed, domain="negative")
                metrics = evaluate(out_dir, root)
            log.info("Held-out classes: zero-shot %.1f%% ('%s'), 16-shot linear probe %.1f%% (chance %.1f%%)",
                     100 * metrics["zero_shot_acc"], ZERO_SHOT_TEMPLATE, 100 * metrics["linear_probe_16shot_acc"],
                     100 * metrics["chance"])
    info = {
        "model": MODEL_NAME,
        "command": command if command is not None else ["tools/build_embedded_model.py"],
        "args": args,
        "weights_sha256": sha,
        "weights_bytes": (out_dir / WEIGHTS_FILE).stat().st_size,
        "model_cfg": MODEL_CFG,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "numpy": np.__version__,
        },
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "final_loss": round(final_loss, 4),
        "eval": {"dataset": "ShapeWorld held-out classes, write_classification_dataset(seed=seed, domain='negative'), test split",
                 "zero_shot_template": ZERO_SHOT_TEMPLATE, **metrics},
    }
    (out_dir / BUILD_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def check(out_dir: Path) -> bool:
    """Rebuild with the arguments recorded in ``out_dir/BUILD.json`` and compare weight hashes."""
    recorded = json.loads((out_dir / BUILD_FILE).read_text(encoding="utf-8"))
    args = recorded["args"]
    with tempfile.TemporaryDirectory() as tmp:
        info = build(Path(tmp) / MODEL_NAME, evaluate_model=False, **args)
    same = info["weights_sha256"] == recorded["weights_sha256"] == sha256_file(out_dir / WEIGHTS_FILE)
    if same:
        log.info("OK: rebuild reproduces %s (sha256 %s)", WEIGHTS_FILE, info["weights_sha256"])
    else:
        log.error("MISMATCH: rebuilt sha256 %s, recorded %s, on disk %s", info["weights_sha256"],
                  recorded["weights_sha256"], sha256_file(out_dir / WEIGHTS_FILE))
    return same


def _quiet_open_clip(record: logging.LogRecord) -> bool:
    """Drop open_clip's chatty INFO records (it logs through the root logger)."""
    return not (record.name == "root" and record.levelno < logging.WARNING and "open_clip" in record.pathname)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (open_clip local-dir)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch.set_num_threads")
    parser.add_argument("--workers", type=int, default=DEFAULTS["workers"], help="data loader workers")
    parser.add_argument("--no-eval", action="store_true", help="skip the zero-shot / linear-probe evaluation")
    parser.add_argument("--check", action="store_true",
                        help="rebuild with the args in OUT/BUILD.json and compare sha256; exit 1 on mismatch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_open_clip)
    if args.check:
        return 0 if check(args.out) else 1
    build(args.out, args.steps, args.batch_size, args.seed, lr=args.lr, weight_decay=args.weight_decay,
          warmup=args.warmup, threads=args.threads, workers=args.workers, evaluate_model=not args.no_eval,
          command=["tools/build_embedded_model.py", *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
