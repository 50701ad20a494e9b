"""Augmented views of a test image and TPT's objective over them (Shu et al., NeurIPS 2022,
"Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language Models")."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from vlprompt.data.images import build_eval_transform, build_train_transform
from vlprompt.tta.augmix import AugMixView

__all__ = ["TestTimeViews", "confident_views", "marginal_entropy", "similar_views"]


class TestTimeViews:
    """Turn one image into ``[n_views, 3, H, W]``: the original (the backbone's own evaluation
    preprocessing) followed by ``n_views - 1`` random views as TPT makes them: a random resized
    crop of ``crop_scale`` of the image and a horizontal flip, optionally mixed with AugMix
    chains (:class:`~vlprompt.tta.augmix.AugMixView`, TPT's operation set and mixing).

    The crop is resized with bilinear interpolation by default, as in TPT's reference code
    (torchvision's default for PIL images); ``crop_interpolation="backbone"`` uses the backbone's
    own (usually bicubic). The views of an image depend only on ``seed`` and the image's pixels,
    never on which images came before, so predictions are reproducible and order-independent.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, preprocess_cfg: dict[str, Any], n_views: int = 64, augmix: bool = False, seed: int = 0,
                 crop_scale: tuple[float, float] = (0.08, 1.0),
                 crop_interpolation: Literal["bilinear", "backbone"] = "bilinear") -> None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        if crop_interpolation not in ("bilinear", "backbone"):
            raise ValueError(f"crop_interpolation must be 'bilinear' or 'backbone', not {crop_interpolation!r}")
        self.n_views, self.augmix, self.seed = n_views, augmix, seed
        self.original = build_eval_transform(preprocess_cfg)
        cfg = dict(preprocess_cfg)
        if crop_interpolation == "bilinear":
            cfg["interpolation"] = "bilinear"
        # The crop and flip, as PIL images (AugMix operates on them), then the normalisation.
        full = build_train_transform(cfg, scale=tuple(crop_scale))
        self.crop = T.Compose(full.transforms[:2])
        self.to_tensor = T.Compose(full.transforms[2:])
        self.mix = AugMixView(self.to_tensor) if augmix else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        digest = hashlib.sha1(image.tobytes()).digest()
        image_seed = (int.from_bytes(digest[:8], "little") ^ self.seed) % 2**63
        rng = np.random.default_rng(image_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_seed)
            views = [self.original(image)]
            for _ in range(self.n_views - 1):
                crop = self.crop(image)
                views.append(self.mix(crop, rng) if self.mix is not None else self.to_tensor(crop))
        return torch.stack(views)


def confident_views(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the ``int(ratio * N)`` views (at least one) with the lowest prediction entropy."""
    if not 0 < ratio <= 1:
        raise ValueError(f"the selection ratio must be in (0, 1], got {ratio}")
    log_probs = logits.float().log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    keep = max(1, int(ratio * logits.shape[0]))
    return entropy.argsort()[:keep]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the prediction averaged over views (the mean of the views' probabilities)."""
    log_probs = logits.float().log_softmax(-1)
    mean_log_prob = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
    return -(mean_log_prob.exp() * mean_log_prob).sum()


def similar_views(embeddings: torch.Tensor, candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """The ``int(ratio * len(candidates))`` (at least one) of ``candidates`` whose rows of
    ``embeddings`` are most cosine-similar to row 0, the original image (DiffTPT's filter)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"the filter ratio must be in (0, 1], got {ratio}")
    if len(candidates) == 0:
        return candidates
    similarity = torch.nn.functional.cosine_similarity(embeddings[candidates].float(), embeddings[:1].float(), dim=-1)
    keep = max(1, int(ratio * len(candidates)))
    return candidates[similarity.argsort(descending=True)[:keep]]
