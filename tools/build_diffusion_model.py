#!/usr/bin/env python
"""Train the embedded ``shapeworld-ddpm-tiny`` diffusion model that DiffTPT uses offline.

A small pixel-space diffusers ``UNet2DModel`` (64x64 RGB) is trained with the usual
epsilon-prediction objective (Ho et al., NeurIPS 2020, "Denoising Diffusion Probabilistic
Models") on ShapeWorld images in the pretraining style, drawn on the fly from seeded generators.
Like a web-scale image generator, it sees every (colour, shape) combination and no labels.

The result is a diffusers pipeline folder (``model_index.json``, ``unet/`` with fp16
safetensors weights, ``scheduler/``), loadable with ``DDPMPipeline.from_pretrained`` from the
local path, plus ``BUILD.json`` with the arguments, weight hash, versions, timing and final loss.

Usage::

    python tools/build_diffusion_model.py                 # full build into vlprompt/zoo/...
    python tools/build_diffusion_model.py --steps 50 --out /tmp/ddpm   # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import diffusers  # noqa: E402
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from build_embedded_model import sha256_file  # noqa: E402
from vlprompt.data import world  # noqa: E402

log = logging.getLogger("build_diffusion_model")

MODEL_NAME = "shapeworld-ddpm-tiny"
DEFAULT_OUT = REPO / "vlprompt" / "zoo" / MODEL_NAME
IMAGE_SIZE = 64
UNET_CFG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (16, 32, 64, 96),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}
SCHEDULER_CFG: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
DEFAULTS: dict[str, Any] = {
    "steps": 3000,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup": 100,
    "ema": 0.995,
    "pool": 6000,
    "seed": 0,
    "threads": 2,
}
# Stream id of the diffusion model's training images (the world uses 1 and 2).
_STREAM_DIFFUSION = 3
_ALL_COMBOS = tuple((c, s) for c in world.COLOURS for s in world.SHAPES)


def world_image(index: int, seed: int) -> np.ndarray:
    """Training image ``index``: any (colour, shape), pretraining style, ``uint8 [H, W, 3]``."""
    rng = np.random.default_rng([seed, _STREAM_DIFFUSION, index])
    spec = world.sample_spec(rng, combos=_ALL_COMBOS)
    return np.asarray(world.render(spec, rng, image_size=IMAGE_SIZE, domain="pretrain"))


def image_pool(n: int, seed: int) -> torch.Tensor:
    """``n`` training images as one ``uint8 [n, 3, H, W]`` tensor."""
    pool = np.stack([world_image(i, seed) for i in range(n)])
    return torch.from_numpy(pool).permute(0, 3, 1, 2).contiguous()


def train(args: argparse.Namespace) -> tuple[UNet2DModel, DDPMScheduler, float]:
    torch.manual_seed(args.seed)
    unet = UNet2DModel(**UNET_CFG)
    scheduler = DDPMScheduler(**SCHEDULER_CFG)
    ema = copy.deepcopy(unet).requires_grad_(False)
    log.info("UNet2DModel: %.2fM parameters", sum(p.numel() for p in unet.parameters()) / 1e6)
    pool = image_pool(args.pool, args.seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    smoothed = float("nan")
    start = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(pool), (args.batch_size,), generator=generator)
        clean = pool[index].float() / 127.5 - 1.0
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(clean, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        smoothed = loss.item() if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.4f (%.0f s)", step, args.steps, smoothed, time.time() - start)
    return ema, scheduler, smoothed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    start = time.time()
    unet, scheduler, loss = train(args)
    pipeline = DDPMPipeline(unet=unet.half(), scheduler=scheduler)
    pipeline.save_pretrained(args.out, safe_serialization=True)
    weights = args.out / "unet" / "diffusion_pytorch_model.safetensors"
    build = {
        "model": MODEL_NAME,
        "command": ["tools/build_diffusion_model.py", *(argv if argv is not None else sys.argv[1:])],
        "args": {k: getattr(args, k) for k in DEFAULTS},
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CFG.items()},
        "scheduler": SCHEDULER_CFG,
        "weights_sha256": sha256_file(weights),
        "weights_bytes": weights.stat().st_size,
        "final_loss": round(loss, 5),
        "seconds": round(time.time() - start, 1),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
    }
    (args.out / "BUILD.json").write_text(json.dumps(build, indent=2) + "\n")
    log.info("wrote %s (%d bytes of weights, loss %.4f)", args.out, build["weights_bytes"], loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
