"""ShapeWorld: a small procedural image-caption world, generated offline from seeds.

Every image shows one object on a noisy, lightly cluttered background. An object is described
by five attributes (a :class:`ShapeSpec`):

* **colour** - one of :data:`COLOURS` (red, orange, yellow, green, cyan, blue, purple, pink);
* **shape** - one of :data:`SHAPES` (circle, square, triangle, star, cross, heart, diamond, arrow);
* **texture** - plain, striped, dotted or checkered (:data:`TEXTURES`);
* **size** - small or large (:data:`SIZES`);
* **position** - top left, top right, bottom left, bottom right or centre (:data:`POSITIONS`).

On top of that each image gets small random jitter: colour shade, object scale, offset and
rotation, stripe angle and texture period, background tint, lighting, noise and clutter.

**Held-out classes.** Of the 8 x 8 (colour, shape) combinations, the 16 in :data:`HELD_OUT` never
occur in pretraining (a Latin-square choice: every colour and every shape is held out with
exactly two partners and still appears with six others). The embedded CLIP model
(``tools/build_embedded_model.py``) is pretrained on images and :func:`caption` texts of the other
48 combinations only; the held-out combos are the downstream classification classes
(:data:`CLASSNAMES`, e.g. ``"red star"``), so recognising them zero-shot needs compositional
generalisation, and few-shot prompt learning has something to gain.

**Negatives.** A share of the pretraining images are photographic negatives, captioned as such
("negative image of a red star": the colour words name the colour before inversion). The demo's
downstream task (``domain="negative"``) shows negatives of the held-out classes. The usual
hand-written prompt "a photo of a red star." says nothing about inversion, so zero-shot CLIP
matches the inverted colours to the wrong classes, while a learned prompt (CoOp) can find the
context that says "negative": the gap few-shot prompt learning exists to close.

**Other domains.** ``"clean"`` downstream images use a flat studio backdrop with a soft vignette
(never seen in pretraining); ``"shifted"`` adds dark or textured backgrounds, coloured lighting
and colourful clutter, for test-time adaptation experiments.

**Determinism.** Everything is a pure function of ``numpy.random.Generator`` streams seeded per
sample (``np.random.default_rng([seed, stream, index])``), so sample ``i`` is the same whatever
the order or number of workers; same arguments give byte-identical PNG files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLASSNAMES",
    "COLOURS",
    "DOMAINS",
    "HELD_OUT",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLIT_FILE",
    "TASKS",
    "TEXTURES",
    "ShapeSpec",
    "caption",
    "class_spec",
    "is_held_out",
    "pretraining_sample",
    "pretraining_samples",
    "render",
    "render_scene",
    "sample_spec",
    "write_caption_dataset",
    "write_classification_dataset",
    "write_segmentation_dataset",
]

log = logging.getLogger(__name__)

Domain = Literal["pretrain", "clean", "negative", "shifted"]
DOMAINS: tuple[str, ...] = ("pretrain", "clean", "negative", "shifted")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 165, 55),
    "cyan": (30, 200, 215),
    "blue": (35, 70, 215),
    "purple": (135, 50, 180),
    "pink": (245, 125, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "arrow")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "centre": (0.5, 0.5),
}

_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# Latin square: colour i is held out with shapes i and i + 3 (mod 8).
HELD_OUT: list[tuple[str, str]] = [
    (_COLOUR_NAMES[i], SHAPES[(i + k) % len(SHAPES)]) for k in (0, 3) for i in range(len(_COLOUR_NAMES))
]
CLASSNAMES: list[str] = [f"{c} {s}" for c, s in HELD_OUT]
_HELD_OUT_SET = frozenset(HELD_OUT)
_PRETRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in _COLOUR_NAMES for s in SHAPES if (c, s) not in _HELD_OUT_SET
)

# Spurious correlations of pretraining (like real photo collections): each colour has a preferred
# texture, each shape a preferred position and size. Similar colours prefer different textures.
PREFERRED_TEXTURE: dict[str, str] = {c: TEXTURES[i % len(TEXTURES)] for i, c in enumerate(_COLOUR_NAMES)}
PREFERRED_POSITION: dict[str, str] = {s: tuple(POSITIONS)[i % len(POSITIONS)] for i, s in enumerate(SHAPES)}
PREFERRED_SIZE: dict[str, str] = {s: SIZES[i % len(SIZES)] for i, s in enumerate(SHAPES)}
PRETRAIN_CORRELATION = 0.8

SPLIT_FILE = "split_zhou_ShapeWorld.json"
_SPLITS: tuple[str, ...] = ("train", "val", "test")
# Stream ids keep the seeded generators of different uses apart.
_STREAM_PRETRAIN = 1
_STREAM_CLASSIFY = 2


@dataclass(frozen=True)
class ShapeSpec:
    """The attributes of the one object in a ShapeWorld image."""

    colour: str
    shape: str
    texture: str = "plain"
    size: str = "large"
    position: str = "centre"

    def __post_init__(self) -> None:
        for value, allowed in (
            (self.colour, _COLOUR_NAMES),
            (self.shape, SHAPES),
            (self.texture, TEXTURES),
            (self.size, SIZES),
            (self.position, tuple(POSITIONS)),
        ):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {list(allowed)}")

    @property
    def classname(self) -> str:
        return f"{self.colour} {self.shape}"


def is_held_out(colour: str, shape: str) -> bool:
    """Whether the (colour, shape) combination is one of the 16 held-out downstream classes."""
    return (colour, shape) in _HELD_OUT_SET


def class_spec(classname: str) -> tuple[str, str]:
    """``"red star"`` -> ``("red", "star")``."""
    colour, shape = classname.split(" ")
    return colour, shape


def sample_spec(
    rng: np.random.Generator,
    *,
    combos: list[tuple[str, str]] | tuple[tuple[str, str], ...] | None = None,
    correlation: float = 0.0,
) -> ShapeSpec:
    """Draw random attributes. ``combos`` restricts (colour, shape); by default the 48 pretraining
    combinations (never a :data:`HELD_OUT` one).

    ``correlation`` is the probability that texture follows the colour's preferred texture and
    that position and size follow the shape's preferred ones (:data:`PREFERRED_TEXTURE` ...);
    otherwise they are uniform. Pretraining uses :data:`PRETRAIN_CORRELATION`; downstream data 0.
    """
    combos = _PRETRAIN_COMBOS if combos is None else combos
    colour, shape = combos[int(rng.integers(len(combos)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    position = tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    # Always draw the coins so the stream does not depend on the outcome.
    coins = rng.random(3)
    if coins[0] < correlation:
        texture = PREFERRED_TEXTURE[colour]
    if coins[1] < correlation:
        position = PREFERRED_POSITION[shape]
    if coins[2] < correlation:
        size = PREFERRED_SIZE[shape]
    return ShapeSpec(colour=colour, shape=shape, texture=texture, size=size, position=position)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.0), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 60, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _cross(w: float = 0.32) -> np.ndarray:
    return np.array(
        [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)],
        dtype=float,
    )


def _arrow() -> np.ndarray:
    return np.array([(-1, -0.3), (0.1, -0.3), (0.1, -0.75), (1, 0), (0.1, 0.75), (0.1, 0.3), (-1, 0.3)], dtype=float)


# Unit-size outlines in image orientation (y down), roughly filling [-1, 1]^2.
_OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular(48),
    "square": np.array([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)], dtype=float),
    "triangle": _regular(3) * 1.05 + np.array([0.0, 0.2]),
    "star": _star(),
    "cross": _cross(),
    "heart": _heart(),
    "diamond": np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], dtype=float),
    "arrow": _arrow(),
}
_SUPERSAMPLE = 4


def _shape_mask(shape: str, centre: tuple[float, float], radius: float, angle: float, size: int) -> np.ndarray:
    """Anti-aliased coverage mask ``[size, size]`` in ``[0, 1]``."""
    pts = _OUTLINES[shape]
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]]) * radius + np.asarray(centre)
    big = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    ImageDraw.Draw(big).polygon([(float(x), float(y)) for x, y in pts * _SUPERSAMPLE], fill=255)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _texture(texture: str, rgb: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Texture of colour ``rgb`` over the whole canvas ``[size, size, 3]`` (float, 0..255)."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    second = rgb * 0.5 if luminance > 140 else rgb * 0.45 + 255 * 0.55
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    period = float(rng.uniform(4.0, 6.5))
    phase_x, phase_y = rng.uniform(0, period, size=2)
    if texture == "plain":
        pattern = np.zeros((size, size), np.float32)
    elif texture == "striped":
        a = float(rng.choice([0.0, 0.5, 0.25, 0.75])) * math.pi + float(rng.uniform(-0.15, 0.15))
        u = (xx * math.cos(a) + yy * math.sin(a) + phase_x) / period
        pattern = ((u % 1.0) < 0.5).astype(np.float32)
    elif texture == "dotted":
        dx = (xx + phase_x) % period - period / 2
        dy = (yy + phase_y) % period - period / 2
        pattern = (np.hypot(dx, dy) < period * 0.27).astype(np.float32)
    elif texture == "checkered":
        cx = np.floor((xx + phase_x) / (period * 0.8))
        cy = np.floor((yy + phase_y) / (period * 0.8))
        pattern = ((cx + cy) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return rgb[None, None, :] * (1 - pattern[..., None]) + second[None, None, :] * pattern[..., None]


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, n: int, colourful: bool,
             kinds: tuple[str, ...] = ("line", "dot")) -> None:
    for _ in range(n):
        if colourful:
            colour = tuple(int(v) for v in rng.integers(40, 256, size=3))
        else:
            g = int(rng.integers(70, 200))
            colour = (g, g, g)
        kind = kinds[int(rng.integers(len(kinds)))]
        x0, y0 = rng.uniform(0, size, size=2)
        if kind == "line":
            length, a = rng.uniform(size * 0.1, size * 0.35), rng.uniform(0, math.pi)
            x1, y1 = x0 + length * math.cos(a), y0 + length * math.sin(a)
            draw.line([(float(x0), float(y0)), (float(x1), float(y1))], fill=colour, width=1)
        else:
            r = float(rng.uniform(0.8, 2.0))
            draw.ellipse([float(x0 - r), float(y0 - r), float(x0 + r), float(y0 + r)], fill=colour)


def _gradient(rng: np.random.Generator, size: int, base: np.ndarray, strength: float) -> np.ndarray:
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    gx, gy = rng.uniform(-strength, strength, size=2)
    return base[None, None, :] + (gx * (xx - 0.5) + gy * (yy - 0.5))[..., None]


def _background(rng: np.random.Generator, size: int, domain: str) -> np.ndarray:
    if domain == "pretrain":
        # A mix of backdrops: noisy grey paper, pastel-tinted paper, dark slate; grey line clutter.
        style = int(rng.integers(3))
        if style == 0:
            base = rng.uniform(150, 215) + rng.uniform(-10, 10, size=3)
        elif style == 1:
            base = rng.uniform(175, 225) + rng.uniform(-25, 25, size=3)
        else:
            base = rng.uniform(55, 115) + rng.uniform(-8, 8, size=3)
        img = _gradient(rng, size, base, 16)
        canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        _clutter(ImageDraw.Draw(canvas), rng, size, int(rng.integers(0, 4)), colourful=False, kinds=("line",))
    elif domain == "clean":
        # Flat studio backdrop (any grey), soft vignette, a few grey specks: never seen in pretraining.
        yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
        base = rng.uniform(80, 225) + rng.uniform(-6, 6, size=3)
        r2 = (xx - 0.5) ** 2 + (yy - 0.5) ** 2
        img = base[None, None, :] * (1 - rng.uniform(0.2, 0.5) * r2[..., None] * 2)
        canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        _clutter(ImageDraw.Draw(canvas), rng, size, int(rng.integers(2, 7)), colourful=False, kinds=("dot",))
    elif domain == "shifted":
        # Coloured backdrop with a strong gradient, coarse blotches and colourful clutter.
        base = rng.uniform(70, 160) + rng.uniform(-25, 25, size=3)
        img = _gradient(rng, size, base, 30)
        blotch = rng.normal(0, 10, size=(size // 8, size // 8, 3)).astype(np.float32)
        img = img + np.kron(blotch, np.ones((8, 8, 1), np.float32))[:size, :size]
        canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        _clutter(ImageDraw.Draw(canvas), rng, size, int(rng.integers(3, 7)), colourful=True)
    else:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    return np.asarray(canvas, dtype=np.float32)


def render(spec: ShapeSpec, rng: np.random.Generator, image_size: int = 64, domain: Domain = "clean") -> Image.Image:
    """Draw ``spec`` as an RGB image, with random jitter from ``rng``.

    ``domain``: ``"pretrain"`` (the pretraining style), ``"clean"`` (downstream style, a modest
    shift: different backdrop and clutter) or ``"shifted"`` (harder shift for test-time adaptation:
    dark or blotchy backgrounds, coloured lighting, colourful clutter).
    """
    return render_scene([spec], rng, image_size=image_size, domain=domain)[0]


def render_scene(specs: list[ShapeSpec], rng: np.random.Generator, image_size: int = 64, domain: Domain = "clean"
                 ) -> tuple[Image.Image, list[np.ndarray]]:
    """Draw several objects on one background, in order (a later one covers an earlier one where
    they overlap), and return the image and each object's visible mask (boolean ``[H, W]``).
    One object draws exactly what :func:`render` draws."""
    if domain == "negative":
        image, masks = render_scene(specs, rng, image_size=image_size, domain="clean")
        return invert(image), masks
    size = image_size
    img = _background(rng, size, domain)
    masks: list[np.ndarray] = []
    for spec in specs:
        rgb = np.asarray(COLOURS[spec.colour], np.float32)
        rgb = np.clip(rgb * rng.uniform(0.88, 1.08) + rng.uniform(-12, 12, size=3), 0, 255)
        fx, fy = POSITIONS[spec.position]
        centre = (
            (fx + rng.uniform(-0.04, 0.04)) * size,
            (fy + rng.uniform(-0.04, 0.04)) * size,
        )
        radius = (0.17 if spec.size == "small" else 0.27) * size * rng.uniform(0.9, 1.1)
        angle = rng.uniform(-0.26, 0.26)
        mask = _shape_mask(spec.shape, centre, radius, angle, size)[..., None]
        tex = _texture(spec.texture, rgb, rng, size)
        img = img * (1 - mask) + tex * mask
        covered = mask[..., 0] > 0.5
        masks = [m & ~covered for m in masks] + [covered]

    if domain == "shifted":
        # Coloured, uneven lighting over the whole scene.
        yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
        gx, gy = rng.uniform(-0.3, 0.3, size=2)
        light = 1.0 + gx * (xx - 0.5) + gy * (yy - 0.5)
        cast = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
        img = img * light[..., None] * cast[None, None, :] * rng.uniform(0.85, 1.1)
        noise = 7.0
    else:
        noise = 4.0 if domain == "pretrain" else 3.0
    img = img + rng.normal(0, noise, size=img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB"), masks


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
_SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "large", "big", "huge")}
_TEXTURE_WORDS = {
    "plain": ("plain", "solid", "plain"),
    "striped": ("striped", "stripy", "striped"),
    "dotted": ("dotted", "spotted", "polka dot"),
    "checkered": ("checkered", "checked", "chequered"),
}
_POSITION_WORDS = {
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
    "centre": ("centre", "center", "middle"),
}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A random short description of ``spec``. Always names the colour and the shape; size,
    texture and position each appear only sometimes. Never uses "a photo of a"."""
    size = _pick(rng, _SIZE_WORDS[spec.size]) if rng.random() < 0.5 else None
    texture = _pick(rng, _TEXTURE_WORDS[spec.texture]) if rng.random() < 0.5 else None
    pos_word = _pick(rng, _POSITION_WORDS[spec.position])
    position = pos_word if rng.random() < 0.4 else None
    if position is None:
        pos_suffix = ""
    elif spec.position == "centre":
        pos_suffix = f" in the {pos_word}"
    else:
        pos_suffix = _pick(rng, (f" in the {pos_word}", f" at the {pos_word}", f" in the {pos_word} corner"))
    colour, shape = spec.colour, spec.shape
    adjs = " ".join(w for w in (size, colour, texture) if w)
    noun = f"{adjs} {shape}"

    template = int(rng.integers(9))
    if template == 0:
        text = f"{_article(noun)} {noun}{pos_suffix}"
    elif template == 1:
        text = f"{noun}{pos_suffix}"
    elif template == 2:
        head = f"{position or pos_word}: " if rng.random() < 0.7 else ""
        extras = ", ".join(w for w in (texture, size) if w)
        text = f"{head}{colour} {shape}" + (f", {extras}" if extras else "")
    elif template == 3:
        text = f"there is {_article(noun)} {noun}{pos_suffix}"
    elif template == 4:
        desc = " and ".join(w for w in (colour, texture) if w)
        text = f"{_article(size or shape)} {size + ' ' if size else ''}{shape} that is {desc}{pos_suffix}"
    elif template == 5:
        text = f"the {shape} is {colour}" + (f" and {texture}" if texture else "") + pos_suffix
    elif template == 6:
        parts = [shape, colour] + [w for w in (size, texture, position) if w]
        text = ", ".join(parts)
    elif template == 7:
        text = f"{_article(noun)} {noun} on a plain background" if rng.random() < 0.5 else f"{noun}, isolated"
    else:
        text = f"one {noun}{pos_suffix}"
    if rng.random() < 0.3:
        text += "."
    return text


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
#: Share of pretraining images that are photographic negatives, captioned as such.
NEGATIVE_FRACTION = 0.35
_NEGATIVE_CAPTIONS = ("negative image of {}", "{}, in negative", "inverted colours: {}", "a negative of {}")


def invert(image: Image.Image) -> Image.Image:
    """The photographic negative of ``image`` (every channel ``v -> 255 - v``)."""
    return Image.fromarray(255 - np.asarray(image, dtype=np.uint8), mode="RGB")


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
        text = _pick(rng, _NEGATIVE_CAPTIONS).format(text.rstrip("."))
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
    "colour": _COLOUR_NAMES,
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
        combos = [(c, s) for c, s in _PRETRAIN_COMBOS if (c if task == "colour" else s) == value]
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
    split: dict[str, list[list[object]]] = {s: [] for s in _SPLITS}
    for label, classname in enumerate(TASKS[task]):
        folder = classname.replace(" ", "_")
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        for split_id, split_name in enumerate(_SPLITS):
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
    :func:`vlprompt.data.segmentation.read_tunevlseg`).

    Every image shows two objects of two different held-out (colour, shape) classes at two of the
    five positions, so a mask is only right if the prompt was read. Each object is an entry: its
    binary mask (0/255 PNG, what is visible of it) and prompts ``p0`` (the class name, e.g.
    ``"red star"``) and ``p1`` (a description in the words of :func:`caption`). Returns ``root``.
    """
    root = Path(root)
    for folder in ("images", "masks", "anns"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split_id, split in enumerate(_SPLITS):
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
