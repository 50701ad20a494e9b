"""A cache of image features for learners that leave the image tower untouched (CoOp, CoCoOp,
KgCoOp, zero-shot): their image features never change, so each image is encoded once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["ImageFeatureCache"]


class ImageFeatureCache:
    """Image features by ``(dataset fingerprint, sample index)``.

    The fingerprint names the data (its sample list and preprocessing, see
    :attr:`vlprompt.data.ImageDataset.fingerprint`), never the split or the shot count: two
    datasets with the same class names but other images (ImageNet and ImageNet-V2) get separate
    entries, and one dataset tested twice is encoded once.
    """

    def __init__(self) -> None:
        self._features: dict[str, dict[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        """Number of cached images over all datasets."""
        return sum(len(v) for v in self._features.values())

    def datasets(self) -> list[str]:
        """Fingerprints of the datasets with cached features."""
        return list(self._features)

    def clear(self) -> None:
        self._features.clear()

    def features(
        self,
        fingerprint: str,
        indices: Sequence[int],
        images: torch.Tensor,
        encode: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Features of ``images`` (items ``indices`` of the dataset ``fingerprint``), encoding
        only those not cached yet."""
        cache = self._features.setdefault(fingerprint, {})
        indices = [int(i) for i in indices]
        missing = [j for j, i in enumerate(indices) if i not in cache]
        if missing:
            with torch.no_grad():
                fresh = encode(images[missing])
            for j, feature in zip(missing, fresh):
                cache[indices[j]] = feature.detach()
        return torch.stack([cache[i] for i in indices]).to(images.device)
