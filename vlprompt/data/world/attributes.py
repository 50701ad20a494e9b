"""ShapeWorld's attributes, its held-out classes and the random draw of an object's attributes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

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

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# Latin square: colour i is held out with shapes i and i + 3 (mod 8).
HELD_OUT: list[tuple[str, str]] = [
    (COLOUR_NAMES[i], SHAPES[(i + k) % len(SHAPES)]) for k in (0, 3) for i in range(len(COLOUR_NAMES))
]
CLASSNAMES: list[str] = [f"{c} {s}" for c, s in HELD_OUT]
_HELD_OUT_SET = frozenset(HELD_OUT)
PRETRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in _HELD_OUT_SET
)

# Spurious correlations of pretraining (like real photo collections): each colour has a preferred
# texture, each shape a preferred position and size. Similar colours prefer different textures.
PREFERRED_TEXTURE: dict[str, str] = {c: TEXTURES[i % len(TEXTURES)] for i, c in enumerate(COLOUR_NAMES)}
PREFERRED_POSITION: dict[str, str] = {s: tuple(POSITIONS)[i % len(POSITIONS)] for i, s in enumerate(SHAPES)}
PREFERRED_SIZE: dict[str, str] = {s: SIZES[i % len(SIZES)] for i, s in enumerate(SHAPES)}
PRETRAIN_CORRELATION = 0.8

SPLIT_FILE = "split_zhou_ShapeWorld.json"
#: The splits of the datasets written to disk.
SPLITS: tuple[str, ...] = ("train", "val", "test")


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
            (self.colour, COLOUR_NAMES),
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
    combos = PRETRAIN_COMBOS if combos is None else combos
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
