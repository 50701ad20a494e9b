"""Writing ShapeWorld datasets to disk: pretraining pairs, classification tasks, referring
segmentation and caption folders, each a pure function of its seed."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from vlprompt.data.world.attributes import (
    CLASSNAMES,
    COLOUR_NAMES,
    HELD_OUT,
    POSITIONS,
    PRETRAIN_COMBOS,
    PRETRAIN_CORRELATION,
    SHAPES,
    SIZES,
    SPLIT_FILE,
    SPLITS,
    TEXTURES,
    Domain,
    ShapeSpec,
    class_spec,
    sample_spec,
)
from vlprompt.data.world.captions import caption, pick_one
from vlprompt.data.world.drawing import invert, render, render_scene

log = logging.getLogger(__name__)

# Stream ids keep the seeded generators of different uses apart.
_STREAM_PRETRAIN = 1
_STREAM_CLASSIFY = 2
#: Share of pretraining images that are photographic negatives, captioned as such.
NEGATIVE_FRACTION = 0.35
_NEGATIVE_CAPTIONS = ("negative image of {}", "{}, in negative", "inverted colours: {}", "a negative of {}")


def pretraining_sample(index: int, seed: int = 0, image_size: int = 64) -> tuple[Image.Image, str, ShapeSpec]:
    """Pretraining example ``index``: image, caption and spec, never a held-out combination.

    A share (:data:`NEGATIVE_FRACTION`) are negatives whose captions say so ("negative image of a
    red star"): the colour words then name the colour *before* inversion, so the model has to
    learn what "negative" does to colours. The downstream ``negative`` domain relies on it.
    """
    rng = np.random.default_rng([seed, _STREAM_PRETRAIN, index])
    spec = sample_spec(rng, correlation=PRETRAIN_CORRELATION)
    image = render(spec, rng, image_size=image_size, domain="pretrain")
    text = caption(spec, rng)
    if rng.random() < NEGATIVE_FRACTION:
        image = invert(image)
        text = pick_one(rng, _NEGATIVE_CAPTIONS).format(text.rstrip("."))
    return image, text, spec


def pretraining_samples(n: int, seed: int = 0, start: int = 0, image_size: int = 64) -> Iterator[tuple[Image.Image, str, ShapeSpec]]:
    """Pretraining examples ``start .. start + n - 1``."""
    for i in range(start, start + n):
        yield pretraining_sample(i, seed, image_size)


#: The classification tasks of the world (for multitask prompt tuning): ``pairs`` are the 16
#: held-out (colour, shape) classes; each other task names one attribute of the object. Attribute
#: tasks draw their images from the pretraining combinations only, so no held-out pair appears in
#: them (a multitask source never sees a target's classes).
TASKS: dict[str, tuple[str, ...]] = {
    "pairs": tuple(CLASSNAMES),
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "texture": TEXTURES,
    "size": SIZES,
    "position": tuple(POSITIONS),
}
_STREAM_TASK = 3


def _task_spec(task: str, value: str, rng: np.random.Generator) -> ShapeSpec:
    if task == "pairs":
        return sample_spec(rng, combos=[class_spec(value)])
    if task in ("colour", "shape"):
        combos = [(c, s) for c, s in PRETRAIN_COMBOS if (c if task == "colour" else s) == value]
        return sample_spec(rng, combos=combos)
    return dataclasses.replace(sample_spec(rng), **{task: value})


def write_classification_dataset(
    root: str | Path,
    *,
    n_train_per_class: int = 32,
    n_val_per_class: int = 8,
    n_test_per_class: int = 32,
    seed: int = 0,
    domain: Domain = "clean",
    image_size: int = 64,
    task: str = "pairs",
) -> Path:
    """Write a classification dataset of the world in the CoOp/Dassl layout: the held-out
    (colour, shape) classes (``task="pairs"``) or one attribute's values (see :data:`TASKS`).

    Images go to ``root/images/<class_name>/<split>_<i>.png`` (spaces in class names become
    underscores); ``root/split_zhou_ShapeWorld.json`` lists ``[relpath, label, classname]`` per
    split with paths relative to ``root/images``. Labels index ``TASKS[task]``. Returns ``root``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown ShapeWorld task {task!r}; tasks: {list(TASKS)}")
    root = Path(root)
    counts = {"train": n_train_per_class, "val": n_val_per_class, "test": n_test_per_class}
    split: dict[str, list[list[object]]] = {s: [] for s in SPLITS}
    for label, classname in enumerate(TASKS[task]):
        folder = classname.replace(" ", "_")
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        for split_id, split_name in enumerate(SPLITS):
            for i in range(counts[split_name]):
                # The pairs keep the streams they always had, so their images never change.
                stream = [_STREAM_CLASSIFY] if task == "pairs" else [_STREAM_TASK, list(TASKS).index(task)]
                rng = np.random.default_rng([seed, *stream, split_id, label, i])
                image = render(_task_spec(task, classname, rng), rng, image_size=image_size, domain=domain)
                relpath = f"{folder}/{split_name}_{i}.png"
                image.save(root / "images" / relpath, format="PNG", optimize=False)
                split[split_name].append([relpath, label, classname])
    with open(root / SPLIT_FILE, "w", encoding="utf-8") as f:
        json.dump(split, f, indent=1)
        f.write("\n")
    log.info("Wrote ShapeWorld %s dataset (%s) to %s: %s", task, domain, root,
             {k: len(v) for k, v in split.items()})
    return root


_STREAM_SEGMENT = 4


def write_segmentation_dataset(
    root: str | Path,
    *,
    n_train: int = 256,
    n_val: int = 64,
    n_test: int = 128,
    seed: int = 0,
    domain: Domain = "clean",
    image_size: int = 64,
) -> Path:
    """Write a referring-segmentation dataset of the world in TuneVLSeg's layout
    (``images/``, ``masks/``, ``anns/{train,val,test}.json``; see
    :func:`vlprompt.data.formats.tunevlseg.read_tunevlseg`).

    Every image shows two objects of two different held-out (colour, shape) classes at two of the
    five positions, so a mask is only right if the prompt was read. Each object is an entry: its
    binary mask (0/255 PNG, what is visible of it) and prompts ``p0`` (the class name, e.g.
    ``"red star"``) and ``p1`` (a description in the words of :func:`caption`). Returns ``root``.
    """
    root = Path(root)
    for folder in ("images", "masks", "anns"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split_id, split in enumerate(SPLITS):
        entries = []
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, _STREAM_SEGMENT, split_id, i])
            first, second = rng.choice(len(HELD_OUT), size=2, replace=False)
            places = rng.choice(len(POSITIONS), size=2, replace=False)
            specs = [
                dataclasses.replace(sample_spec(rng, combos=[HELD_OUT[int(k)]]), position=tuple(POSITIONS)[int(p)])
                for k, p in ((first, places[0]), (second, places[1]))
            ]
            image, masks = render_scene(specs, rng, image_size=image_size, domain=domain)
            name = f"{split}_{i}"
            image.save(root / "images" / f"{name}.png", format="PNG", optimize=False)
            for k, (spec, mask) in enumerate(zip(specs, masks)):
                mask_name = f"{name}_{k}.png"
                Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(root / "masks" / mask_name)
                entries.append({"img_name": f"{name}.png", "mask_name": mask_name,
                                "prompts": {"p0": spec.classname, "p1": caption(spec, rng).rstrip(".")}})
        (root / "anns" / f"{split}.json").write_text(json.dumps(entries, indent=1) + "\n")
    log.info("Wrote ShapeWorld segmentation dataset (%s) to %s: %s", domain, root, counts)
    return root


def write_caption_dataset(root: str | Path, n: int = 2048, *, seed: int = 0, start: int = 5_000_000,
                          image_size: int = 64) -> Path:
    """Write ``n`` captioned pretraining images of the world (``0000001.png`` + ``0000001.txt``; no
    labels), samples ``start ..`` of :func:`pretraining_sample` (beyond those the embedded CLIP
    was trained on): unlabelled image-text pairs for meta-learning (GRAM). Returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, (image, text, _) in enumerate(pretraining_samples(n, seed=seed, start=start, image_size=image_size)):
        image.save(root / f"{i:07d}.png", format="PNG", optimize=False)
        (root / f"{i:07d}.txt").write_text(text + "\n")
    log.info("Wrote %d ShapeWorld image-caption pairs to %s", n, root)
    return root
