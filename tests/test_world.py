"""ShapeWorld (vlprompt.data.world) and the determinism of tools/build_embedded_model.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from vlprompt.data import world

REPO = Path(__file__).resolve().parents[1]


def _build_module():
    path = REPO / "tools" / "build_embedded_model.py"
    spec = importlib.util.spec_from_file_location("build_embedded_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_held_out_is_a_latin_square():
    assert len(world.HELD_OUT) == 16 == len(set(world.HELD_OUT))
    assert world.CLASSNAMES == [f"{c} {s}" for c, s in world.HELD_OUT]
    for colour in world.COLOURS:
        assert sum(c == colour for c, _ in world.HELD_OUT) == 2
    for shape in world.SHAPES:
        assert sum(s == shape for _, s in world.HELD_OUT) == 2
    assert all(world.is_held_out(*world.class_spec(name)) for name in world.CLASSNAMES)


@pytest.mark.parametrize("domain", list(world.DOMAINS))
def test_render_is_deterministic(domain):
    spec = world.ShapeSpec("red", "star", "striped", "large", "top left")
    a = world.render(spec, np.random.default_rng([7, 1]), domain=domain)
    b = world.render(spec, np.random.default_rng([7, 1]), domain=domain)
    c = world.render(spec, np.random.default_rng([7, 2]), domain=domain)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_object_is_drawn_in_its_colour():
    # A large plain object in the centre: the centre pixel is close to the object's colour.
    for colour, rgb in world.COLOURS.items():
        spec = world.ShapeSpec(colour, "square", "plain", "large", "centre")
        img = np.asarray(world.render(spec, np.random.default_rng(0)), dtype=float)
        assert np.abs(img[30:34, 30:34].mean((0, 1)) - np.asarray(rgb)).max() < 45, colour


def test_pretraining_sampler_never_shows_held_out_and_is_order_free():
    seen = set()
    for i in range(600):
        _, text, spec = world.pretraining_sample(i, seed=3, image_size=32)
        assert not world.is_held_out(spec.colour, spec.shape)
        seen.add((spec.colour, spec.shape))
    assert len(seen) == 48
    img_a, text_a, _ = world.pretraining_sample(123, seed=3)
    list(world.pretraining_samples(5, seed=3))  # consuming other samples changes nothing
    img_b, text_b, _ = world.pretraining_sample(123, seed=3)
    assert text_a == text_b and np.array_equal(np.asarray(img_a), np.asarray(img_b))


def test_captions_mention_colour_and_shape():
    rng = np.random.default_rng(0)
    texts = set()
    for _ in range(500):
        spec = world.sample_spec(rng)
        text = world.caption(spec, rng)
        assert spec.colour in text and spec.shape in text, text
        assert "photo of" not in text
        texts.add(text)
    assert len(texts) > 300  # varied templates and attribute subsets


def test_write_classification_dataset(tmp_path):
    kwargs = dict(n_train_per_class=2, n_val_per_class=1, n_test_per_class=2, seed=5)
    root = world.write_classification_dataset(tmp_path / "a", **kwargs)
    split = json.loads((root / world.SPLIT_FILE).read_text())
    assert set(split) == {"train", "val", "test"}
    n = len(world.CLASSNAMES)
    assert [len(split[s]) for s in ("train", "val", "test")] == [2 * n, n, 2 * n]
    for items in split.values():
        for relpath, label, classname in items:
            assert (root / "images" / relpath).is_file()
            assert world.CLASSNAMES[label] == classname
            assert relpath.split("/")[0] == classname.replace(" ", "_")
    again = world.write_classification_dataset(tmp_path / "b", **kwargs)
    assert _tree_digest(root) == _tree_digest(again)
    other = world.write_classification_dataset(tmp_path / "c", **{**kwargs, "seed": 6})
    assert _tree_digest(root) != _tree_digest(other)


def test_build_is_deterministic(tmp_path):
    build = _build_module().build
    kwargs = dict(steps=3, batch_size=16, seed=0, warmup=1, workers=0, evaluate_model=False, progress=False)
    info_a = build(tmp_path / "a", **kwargs)
    info_b = build(tmp_path / "b", **kwargs)
    weights = "open_clip_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
    assert info_a["weights_sha256"] == info_b["weights_sha256"]
    cfg = json.loads((tmp_path / "a" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["context_length"] == 32
    assert cfg["preprocess_cfg"]["size"] == 64
