"""Referring segmentation generated from the embedded world: masks, prompts and the data module."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from vlprompt.data import ShapeWorldSegmentationDataModule
from vlprompt.data import world


def test_one_object_scene_is_the_single_object_render_and_masks_are_what_is_visible():
    spec = world.sample_spec(np.random.default_rng(0), combos=world.HELD_OUT)
    image, (mask,) = world.render_scene([spec], np.random.default_rng(1), domain="clean")
    assert np.array_equal(np.asarray(image), np.asarray(world.render(spec, np.random.default_rng(1), domain="clean")))
    assert 0.02 < mask.mean() < 0.5
    a = world.ShapeSpec("red", "square", position="centre", size="large")
    b = world.ShapeSpec("blue", "circle", position="centre", size="small")
    _, (under, over) = world.render_scene([a, b], np.random.default_rng(2), domain="negative")
    assert not (under & over).any() and over.sum() > 0 and under.sum() > 0  # b covers the middle of a


def test_dataset_has_two_objects_an_image_and_is_deterministic(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b"):
        world.write_segmentation_dataset(root, n_train=6, n_val=2, n_test=2, domain="shifted")
    digest = lambda root: hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.*")))).hexdigest()  # noqa: E731
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    entries = json.loads((tmp_path / "a" / "anns" / "train.json").read_text())
    assert len(entries) == 12
    for first, second in zip(entries[::2], entries[1::2]):
        assert first["img_name"] == second["img_name"] and first["prompts"]["p0"] != second["prompts"]["p0"]
        assert {first["prompts"]["p0"], second["prompts"]["p0"]} <= set(world.CLASSNAMES)
        masks = [np.asarray(Image.open(tmp_path / "a" / "masks" / e["mask_name"])) for e in (first, second)]
        assert set(np.unique(masks[0])) <= {0, 255} and not ((masks[0] > 0) & (masks[1] > 0)).any()
        colour, shape = first["prompts"]["p0"].split()
        assert colour in first["prompts"]["p1"] and shape in first["prompts"]["p1"]


def test_data_module_serves_images_masks_and_prompts(tmp_path):
    dm = ShapeWorldSegmentationDataModule(str(tmp_path / "seg"), domain="negative", size=64, batch_size=4,
                                          num_workers=0, augment=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].shape == (4, 1, 64, 64)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0} and all(isinstance(p, str) and p for p in batch["prompt"])
    with pytest.raises(ValueError, match="holds a ShapeWorld dataset made with"):
        ShapeWorldSegmentationDataModule(str(tmp_path / "seg"), domain="clean")
