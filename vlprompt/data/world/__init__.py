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

**Modules.** ``attributes`` (the attributes, held-out classes and :func:`sample_spec`),
``drawing`` (:func:`render`, :func:`render_scene`), ``captions`` (:func:`caption`), ``writers``
(datasets written to disk) and ``datamodules`` (the ShapeWorld data modules, imported on first use
so that generating images needs neither PyTorch nor Lightning).
"""

from vlprompt.data.lazy import lazy_exports
from vlprompt.data.world.attributes import (
    CLASSNAMES,
    COLOURS,
    DOMAINS,
    HELD_OUT,
    POSITIONS,
    PREFERRED_POSITION,
    PREFERRED_SIZE,
    PREFERRED_TEXTURE,
    PRETRAIN_CORRELATION,
    SHAPES,
    SIZES,
    SPLIT_FILE,
    TEXTURES,
    Domain,
    ShapeSpec,
    class_spec,
    is_held_out,
    sample_spec,
)
from vlprompt.data.world.captions import caption
from vlprompt.data.world.drawing import invert, render, render_scene
from vlprompt.data.world.writers import (
    NEGATIVE_FRACTION,
    TASKS,
    pretraining_sample,
    pretraining_samples,
    write_caption_dataset,
    write_classification_dataset,
    write_segmentation_dataset,
)

_LAZY = {name: "vlprompt.data.world.datamodules" for name in (
    "ShapeWorldDataModule", "ShapeWorldPairsDataModule", "ShapeWorldSegmentationDataModule", "ensure_shapeworld")}

__all__ = [
    "CLASSNAMES",
    "COLOURS",
    "DOMAINS",
    "HELD_OUT",
    "NEGATIVE_FRACTION",
    "POSITIONS",
    "PREFERRED_POSITION",
    "PREFERRED_SIZE",
    "PREFERRED_TEXTURE",
    "PRETRAIN_CORRELATION",
    "SHAPES",
    "SIZES",
    "SPLIT_FILE",
    "TASKS",
    "TEXTURES",
    "Domain",
    "ShapeSpec",
    "ShapeWorldDataModule",
    "ShapeWorldPairsDataModule",
    "ShapeWorldSegmentationDataModule",
    "caption",
    "class_spec",
    "ensure_shapeworld",
    "invert",
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
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
