"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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
