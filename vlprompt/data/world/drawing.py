"""Rendering ShapeWorld objects and scenes: outlines, textures, backgrounds, lighting and noise."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from vlprompt.data.world.attributes import COLOURS, DOMAINS, POSITIONS, Domain, ShapeSpec


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


def invert(image: Image.Image) -> Image.Image:
    """The photographic negative of ``image`` (every channel ``v -> 255 - v``)."""
    return Image.fromarray(255 - np.asarray(image, dtype=np.uint8), mode="RGB")
