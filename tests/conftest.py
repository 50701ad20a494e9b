"""Shared fixtures: tiny random open_clip encoders and small image datasets on disk."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlprompt.backbones import OpenCLIPBackbone

logging.getLogger("root").setLevel(logging.ERROR)  # open_clip warns that random models have no weights

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N already runs N processes; more threads each would oversubscribe the cores.
    torch.set_num_threads(1)

# Text and vision widths differ on purpose, so nothing can confuse them.
TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3},
}

COLOURS = {"red square": (200, 30, 30), "green square": (30, 200, 30), "blue square": (30, 30, 200), "yellow square": (220, 220, 30)}


def write_model_dir(path: Path, model_cfg: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return path


def make_backbone(path: Path, model_cfg: dict = TINY_CLIP, seed: int = 0, **kwargs) -> OpenCLIPBackbone:
    torch.manual_seed(seed)
    return OpenCLIPBackbone(f"local-dir:{write_model_dir(path, model_cfg)}", **kwargs)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("tiny_clip"), TINY_CLIP)


@pytest.fixture(scope="session")
def backbone(tiny_model_dir) -> OpenCLIPBackbone:
    torch.manual_seed(0)
    return OpenCLIPBackbone(f"local-dir:{tiny_model_dir}")


def write_image(path: Path, rgb: tuple[int, int, int], rng: np.random.Generator, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = rng.integers(-40, 40, size=(size, size, 3))
    arr = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """``root/<class>/*.png``: 4 colour classes, 10 images each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "colours"
    for name, rgb in COLOURS.items():
        for i in range(10):
            write_image(root / name.replace(" ", "_") / f"{i}.png", rgb, rng)
    return root


def write_dassl_folder(root: Path, seed: int = 1) -> Path:
    """A CoOp/Dassl-style folder: ``images/`` and ``split_zhou_Colours.json``; 4 colour classes with
    8 train, 4 val and 6 test images each."""
    rng = np.random.default_rng(seed)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, (name, rgb) in enumerate(COLOURS.items()):
        for s, n in (("train", 8), ("val", 4), ("test", 6)):
            for i in range(n):
                rel = f"{name.replace(' ', '_')}/{s}_{i}.png"
                write_image(root / "images" / rel, rgb, rng)
                split[s].append([rel, label, name])
    (root / "split_zhou_Colours.json").write_text(json.dumps(split))
    return root


@pytest.fixture()
def dassl_folder(tmp_path) -> Path:
    return write_dassl_folder(tmp_path / "colours_dassl")


def pytest_collection_modifyitems(config, items):
    """The ``gpu`` tier runs where CUDA is, or on the CPU with ``VLPROMPT_GPU_SMOKE=1`` (tiny sizes)."""
    if torch.cuda.is_available() or os.environ.get("VLPROMPT_GPU_SMOKE") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (VLPROMPT_GPU_SMOKE=1 runs it on the CPU with tiny models)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
