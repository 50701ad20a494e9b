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


def device_name(device: torch.device | str) -> str:
    """The card's name, or the CPU's thread count: absolute figures are labelled with it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: torch.device | str) -> float | None:
    """Peak CUDA memory allocated since :func:`reset_peak_memory`; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def add_json_argument(parser) -> None:
    parser.add_argument("--json", default=None, help="also write the measured rows to this JSON file")


def write_json(path: str | None, benchmark: str, device: torch.device | str, settings: dict[str, Any],
               rows: list[dict[str, Any]]) -> None:
    """The measurements as ``{benchmark, device, settings, rows}`` (read by ``gpu_report.py``)."""
    if path:
        Path(path).write_text(json.dumps({"benchmark": benchmark, "device": device_name(device),
                                          "settings": settings, "rows": rows}, indent=1))
