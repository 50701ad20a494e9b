"""Exact resumption: training checkpoints carry the random state, and a resumed fit restores it."""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

__all__ = ["RandomStateCheckpoint", "get_random_state", "set_random_state"]

log = logging.getLogger(__name__)


def get_random_state() -> dict[str, Any]:
    """The state of Python's, NumPy's and torch's (CPU and CUDA) global generators, as tensors and
    plain values so that a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_random_state` returned."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomStateCheckpoint(pl.Callback):
    """Saves the global random state with every training checkpoint and restores it when a fit
    resumes from one, so that the resumed run draws the same shuffles and augmentations as an
    uninterrupted one.

    The state is restored as the checkpoint is loaded, before the first resumed epoch builds its
    data iterator (Lightning's sanity check in between runs with an isolated random state). Exact for single-process runs with ``num_workers=0`` or non-persistent workers: persistent
    data-loader workers keep their own generators, which no checkpoint captures. Under DDP every
    process restores the state saved by rank zero.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"random_state": get_random_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "random_state" in state_dict:
            set_random_state(state_dict["random_state"])
            log.info("resumed with the random state saved in the checkpoint")
