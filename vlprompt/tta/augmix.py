"""AugMix views as TPT makes them (Shu et al., NeurIPS 2022; AugMix: Hendrycks et al., ICLR 2020).

A view is a random resized crop and flip of the image, mixed with three augmentation chains:
each chain applies 1 to 3 operations drawn from AugMix's set without the operations that overlap
ImageNet-C (autocontrast, equalize, posterize, rotate, solarize, shear and translate in x and y)
at severity 1; the chains' normalised images are weighted by Dirichlet(1, 1, 1) weights and the
result is mixed with the un-augmented crop by a Beta(1, 1) weight, on normalised tensors.

vlprompt differs from the reference code in two ways: the random numbers come from a generator
seeded by the image's content (views do not depend on which images came before), and the affine
operations use the crop's own size instead of a fixed 224.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["AUGMIX_OPERATIONS", "AugMixView"]


def _level(rng: np.random.Generator, severity: float) -> float:
    return float(rng.uniform(0.1, severity))


def _int_parameter(level: float, maximum: float) -> int:
    return int(level * maximum / 10)


def _signed(rng: np.random.Generator, value: float) -> float:
    return -value if rng.uniform() > 0.5 else value


def autocontrast(image: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    return ImageOps.autocontrast(image)


def equalize(image: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    return ImageOps.equalize(image)


def posterize(image: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    return ImageOps.posterize(image, 4 - _int_parameter(_level(rng, severity), 4))


def rotate(image: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    degrees = _int_parameter(_level(rng, severity), 30)
    return image.rotate(_signed(rng, degrees), resample=Image.BILINEAR)


def solarize(image: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    return ImageOps.solarize(image, 256 - _int_parameter(_level(rng, severity), 256))


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, coefficients, resample=Image.BILINEAR)


def shear_x(image: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    shear = _signed(rng, _level(rng, severity) * 0.3 / 10)
    return _affine(image, (1, shear, 0, 0, 1, 0))


def shear_y(image: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    shear = _signed(rng, _level(rng, severity) * 0.3 / 10)
    return _affine(image, (1, 0, 0, shear, 1, 0))


def translate_x(image: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    shift = _signed(rng, _int_parameter(_level(rng, severity), image.size[0] / 3))
    return _affine(image, (1, 0, shift, 0, 1, 0))


def translate_y(image: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    shift = _signed(rng, _int_parameter(_level(rng, severity), image.size[1] / 3))
    return _affine(image, (1, 0, 0, 0, 1, shift))


#: AugMix's operations without those that overlap ImageNet-C, as TPT uses them.
AUGMIX_OPERATIONS: tuple[Callable[[Image.Image, np.random.Generator, float], Image.Image], ...] = (
    autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y,
)


class AugMixView:
    """One AugMix view of a pre-augmented crop: ``view(crop, rng)`` -> normalised tensor.

    Args:
        to_tensor: PIL image -> normalised tensor (the backbone's normalisation).
        severity: operation severity (TPT: 1).
        chains: number of augmentation chains (3).
    """

    def __init__(self, to_tensor: Callable[[Image.Image], torch.Tensor], severity: float = 1.0, chains: int = 3) -> None:
        self.to_tensor, self.severity, self.chains = to_tensor, severity, chains

    def __call__(self, crop: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        plain = self.to_tensor(crop)
        weights = rng.dirichlet([1.0] * self.chains).astype(np.float32)
        mixing = np.float32(rng.beta(1.0, 1.0))
        mix = torch.zeros_like(plain)
        for weight in weights:
            augmented = crop.copy()
            for _ in range(rng.integers(1, 4)):  # 1 to 3 operations
                operation = AUGMIX_OPERATIONS[rng.integers(len(AUGMIX_OPERATIONS))]
                augmented = operation(augmented, rng, self.severity)
            mix += float(weight) * self.to_tensor(augmented)
        return float(mixing) * plain + (1 - float(mixing)) * mix
