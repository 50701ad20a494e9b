"""Random short descriptions of a ShapeWorld object, in many phrasings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vlprompt.data.world.attributes import ShapeSpec

__all__ = ["caption", "pick_one"]

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
    """One of ``options``, drawn uniformly from ``rng``."""
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class _Words:
    """The words of one caption: colour and shape always, the others only when drawn."""

    colour: str
    shape: str
    size: str | None
    texture: str | None
    pos_word: str  # the position's word, drawn even when the caption leaves the position out
    position: str | None
    pos_suffix: str  # " in the top left" ... or ""

    @property
    def noun(self) -> str:
        adjectives = " ".join(w for w in (self.size, self.colour, self.texture) if w)
        return f"{adjectives} {self.shape}"


def _draw_words(spec: ShapeSpec, rng: np.random.Generator) -> _Words:
    # The draws happen in this order whatever their outcome: captions are part of the world's
    # seeded streams, which must not change.
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
    return _Words(spec.colour, spec.shape, size, texture, pos_word, position, pos_suffix)


def _heading(w: _Words, rng: np.random.Generator) -> str:
    head = f"{w.position or w.pos_word}: " if rng.random() < 0.7 else ""
    extras = ", ".join(x for x in (w.texture, w.size) if x)
    return f"{head}{w.colour} {w.shape}" + (f", {extras}" if extras else "")


def _that_is(w: _Words, rng: np.random.Generator) -> str:
    desc = " and ".join(x for x in (w.colour, w.texture) if x)
    return f"{_article(w.size or w.shape)} {w.size + ' ' if w.size else ''}{w.shape} that is {desc}{w.pos_suffix}"


def _isolated(w: _Words, rng: np.random.Generator) -> str:
    return f"{_article(w.noun)} {w.noun} on a plain background" if rng.random() < 0.5 else f"{w.noun}, isolated"


#: The caption templates, drawn uniformly; some draw more words from the generator.
_TEMPLATES: tuple[Callable[[_Words, np.random.Generator], str], ...] = (
    lambda w, rng: f"{_article(w.noun)} {w.noun}{w.pos_suffix}",
    lambda w, rng: f"{w.noun}{w.pos_suffix}",
    _heading,
    lambda w, rng: f"there is {_article(w.noun)} {w.noun}{w.pos_suffix}",
    _that_is,
    lambda w, rng: f"the {w.shape} is {w.colour}" + (f" and {w.texture}" if w.texture else "") + w.pos_suffix,
    lambda w, rng: ", ".join([w.shape, w.colour] + [x for x in (w.size, w.texture, w.position) if x]),
    _isolated,
    lambda w, rng: f"one {w.noun}{w.pos_suffix}",
)


def caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A random short description of ``spec``. Always names the colour and the shape; size,
    texture and position each appear only sometimes. Never uses "a photo of a"."""
    words = _draw_words(spec, rng)
    text = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))](words, rng)
    if rng.random() < 0.3:
        text += "."
    return text
