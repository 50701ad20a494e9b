"""Random short descriptions of a ShapeWorld object, in many phrasings."""

from __future__ import annotations

import numpy as np

from vlprompt.data.world.attributes import ShapeSpec

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


def pick_one(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A random short description of ``spec``. Always names the colour and the shape; size,
    texture and position each appear only sometimes. Never uses "a photo of a"."""
    size = pick_one(rng, _SIZE_WORDS[spec.size]) if rng.random() < 0.5 else None
    texture = pick_one(rng, _TEXTURE_WORDS[spec.texture]) if rng.random() < 0.5 else None
    pos_word = pick_one(rng, _POSITION_WORDS[spec.position])
    position = pos_word if rng.random() < 0.4 else None
    if position is None:
        pos_suffix = ""
    elif spec.position == "centre":
        pos_suffix = f" in the {pos_word}"
    else:
        pos_suffix = pick_one(rng, (f" in the {pos_word}", f" at the {pos_word}", f" in the {pos_word} corner"))
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
