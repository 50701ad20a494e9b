"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up, and its last result."""
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def random_open_clip(model: str, size: int, device: torch.device):
    """A random-weight open_clip ``model`` at ``size`` px (positional embeddings for that grid),
    behind vlprompt's backbone API: nothing is downloaded."""
    import open_clip

    from vlprompt.backbones import OpenCLIPBackbone

    cfg = open_clip.get_model_config(model)
    cfg["vision_cfg"]["image_size"] = size
    folder = Path(tempfile.mkdtemp(prefix="vlprompt-bench-"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return OpenCLIPBackbone(f"local-dir:{folder}").to(device)
