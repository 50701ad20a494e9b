"""Gaussian prompt aggregation (PromptSRC) as a Lightning callback over the prompt parameters."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["GaussianPromptAggregation", "gaussian_epoch_weights"]

log = logging.getLogger(__name__)


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """PromptSRC's aggregation weights: a Gaussian over epochs ``1..epochs``, normalised to sum 1."""
    if epochs < 1 or std <= 0:
        raise ValueError(f"need epochs >= 1 and std > 0, got {epochs} and {std}")
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
    total = sum(density)
    if total == 0.0:
        raise ValueError(f"the Gaussian (mean {mean}, std {std}) puts no weight on epochs 1..{epochs}")
    return [d / total for d in density]


class GaussianPromptAggregation(pl.Callback):
    """Gaussian prompt aggregation (GPA) of PromptSRC (Khattak et al., ICCV 2023): at the end of
    every training epoch the prompt is added to a running average weighted by a Gaussian over the
    epoch index; when training ends the average replaces the prompt, so the prompt saved after
    ``fit`` is the aggregated one.

    Only ``pl_module.prompt_learner``'s learnable parameters are averaged. Lightning's
    ``WeightAveraging`` callback is not used because it keeps a deep copy of the whole
    LightningModule, frozen encoder included, and updates per step rather than with per-epoch
    weights. The running sums are callback state, saved in training checkpoints, so an
    interrupted fit resumes with them.

    Args:
        mean: epoch (counted from 1) where the weights peak; None = 3/4 of ``max_epochs`` (the
            paper's 15 of 20 epochs).
        std: width of the Gaussian in epochs.
    """

    def __init__(self, mean: float | None = None, std: float = 1.0) -> None:
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.mean, self.std = mean, std
        self._sum: dict[str, torch.Tensor] = {}
        self._weight = 0.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        max_epochs = trainer.max_epochs
        if not max_epochs or max_epochs < 1:
            if trainer.current_epoch == 0:
                log.warning("GaussianPromptAggregation needs trainer.max_epochs; keeping the last prompt")
            return
        mean = self.mean if self.mean is not None else 0.75 * max_epochs
        weight = gaussian_epoch_weights(max_epochs, mean, self.std)[min(trainer.current_epoch, max_epochs - 1)]
        with torch.no_grad():
            for name, param in pl_module.prompt_learner.named_parameters():
                contribution = weight * param.detach().float()
                self._sum[name] = self._sum[name].to(param.device) + contribution if name in self._sum else contribution
        self._weight += weight

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._weight <= 0:
            return
        with torch.no_grad():
            for name, param in pl_module.prompt_learner.named_parameters():
                param.copy_((self._sum[name].to(param.device) / self._weight).to(param.dtype))
        log.info("replaced the prompt by its Gaussian-weighted average over epochs (PromptSRC's GPA)")
        self._sum, self._weight = {}, 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"sum": {k: v.cpu() for k, v in self._sum.items()}, "weight": self._weight}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sum = dict(state_dict.get("sum", {}))
        self._weight = float(state_dict.get("weight", 0.0))
