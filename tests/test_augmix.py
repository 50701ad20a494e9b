"""TPT's AugMix: the operations, the mixing, and the views' crop interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from vlprompt.tta import TestTimeViews
from vlprompt.tta import augmix as A


def _image(size=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_operations_do_what_they_say_and_keep_the_size():
    image, rng = _image(), np.random.default_rng(0)
    for op in A.AUGMIX_OPERATIONS:
        assert op(image, np.random.default_rng(1), 1.0).size == image.size
    assert {op.__name__ for op in A.AUGMIX_OPERATIONS} == {
        "autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x", "translate_y"}
    # severity 1 levels are in [0.1, 1): solarize's threshold is 256 - int(level * 25.6) > 230
    solarized = np.asarray(A.solarize(image, rng, 1.0)).astype(int)
    original = np.asarray(image).astype(int)
    assert np.array_equal(solarized[original < 230], original[original < 230])
    assert (solarized[original == 255] == 0).all()
    posterized = np.asarray(A.posterize(image, rng, 1.0))
    assert np.array_equal(posterized, np.asarray(image) & 0xF0)  # 4 bits kept at severity 1
    shifted = np.asarray(A.translate_x(Image.fromarray(np.full((30, 30, 3), 200, np.uint8)), np.random.default_rng(3), 1.0))
    assert shifted.shape == (30, 30, 3)


def test_mixing_follows_the_reference_distributions():
    to_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)  # noqa: E731
    view = A.AugMixView(to_tensor)
    crop = _image()
    out = view(crop, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    weights = rng.dirichlet([1.0] * 3).astype(np.float32)
    mixing = np.float32(rng.beta(1.0, 1.0))
    assert abs(weights.sum() - 1) < 1e-6 and 0 <= mixing <= 1
    assert out.shape == to_tensor(crop).shape and not torch.equal(out, to_tensor(crop))
    assert torch.equal(view(crop, np.random.default_rng(5)), out)  # seeded


@pytest.mark.parametrize("augmix", [False, True])
def test_views_are_reproducible_per_image_and_use_bilinear_crops(backbone, augmix):
    views = TestTimeViews(backbone.preprocess_cfg, n_views=6, augmix=augmix)
    a, b = _image(48, 1), _image(48, 2)
    first = views(a)
    views(b)
    assert torch.equal(views(a), first) and torch.equal(first[0], views.original(a))
    assert not torch.equal(first[1], first[2])
    assert views.crop.transforms[0].interpolation == T.InterpolationMode.BILINEAR  # TPT's reference crops
    own = TestTimeViews(backbone.preprocess_cfg, n_views=2, crop_interpolation="backbone")
    assert own.crop.transforms[0].interpolation == T.InterpolationMode[backbone.preprocess_cfg["interpolation"].upper()]
