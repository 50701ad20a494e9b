"""TuneVLSeg's data side: its training augmentation (affine and brightness/contrast, each with
probability 0.2, after a resize) and its cubic resizing both ways, as options of the segmentation
data modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_seg_data import make_tunevlseg
from vlprompt.data.segmentation import SegmentationDataModule

A = pytest.importorskip("albumentations")
cv2 = pytest.importorskip("cv2")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_tunevlseg_augmentation_is_its_transform_list(tmp_path):
    dm = SegmentationDataModule(str(make_tunevlseg(tmp_path / "d", size=(40, 40))), num_workers=0, size=32,
                                augmentation="tunevlseg", area_downscale=False)
    dm.setup("fit")
    steps = dm.dataset("train").transform.transforms
    assert [type(t).__name__ for t in steps] == ["Resize", "Affine", "RandomBrightnessContrast", "Normalize"]
    resize, affine, jitter, _ = steps
    assert resize.interpolation == cv2.INTER_CUBIC and resize.area_for_downscale is None
    assert affine.p == 0.2 and affine.border_mode == cv2.BORDER_REPLICATE and affine.interpolation == cv2.INTER_CUBIC
    assert tuple(affine.rotate) == (-5, 5) and tuple(affine.scale["x"]) == (0.98, 1.02)
    assert tuple(affine.translate_percent["x"]) == (-0.02, 0.02)
    assert jitter.p == 0.2 and tuple(jitter.brightness_limit) == (-0.1, 0.1) and tuple(jitter.contrast_limit) == (-0.1, 0.1)
    # evaluation: TuneVLSeg's resize and normalisation, nothing random
    assert [type(t).__name__ for t in dm.dataset("val").transform.transforms] == ["Resize", "Normalize"]
    assert dm.train_augmentation


def test_cubic_resize_both_ways_is_cv2s(tmp_path):
    root = make_tunevlseg(tmp_path / "d", size=(40, 40))
    dm = SegmentationDataModule(str(root), num_workers=0, size=32, augment=False, area_downscale=False,
                                mean=MEAN, std=STD)
    dm.setup("fit")
    item = dm.dataset("val")[0]
    from PIL import Image

    raw = np.asarray(Image.open(root / "images" / "c.png").convert("RGB"))
    expected = (cv2.resize(raw, (32, 32), interpolation=cv2.INTER_CUBIC) / 255.0 - MEAN) / STD
    assert torch.allclose(item["image"], torch.from_numpy(expected.transpose(2, 0, 1)).float(), atol=1e-5)


def test_augmented_items_keep_binary_masks_and_shapes(tmp_path):
    dm = SegmentationDataModule(str(make_tunevlseg(tmp_path / "d", size=(40, 40))), num_workers=0, size=32,
                                augmentation="tunevlseg", seed=0)
    dm.setup("fit")
    ds = dm.dataset("train")
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_unknown_augmentation_is_refused(tmp_path):
    dm = SegmentationDataModule(str(make_tunevlseg(tmp_path / "d")), num_workers=0, augmentation="mixup")
    with pytest.raises(ValueError, match="augmentation must be 'crop' or 'tunevlseg'"):
        dm.setup("fit")
