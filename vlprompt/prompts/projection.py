"""TuneVLSeg's projection layers (Adhikari et al., ACCV 2024, ``BaseProjectorLearner``): the maps
its multimodal and conditional strategies put between a learned tensor and the width a tower needs.

Used by the shared-separate strategy (shared context -> text and visual prompts) and by deep
CoCoOp (image feature -> context shift).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

__all__ = ["layer_at", "mlp_projection", "per_layer"]


def mlp_projection(in_dim: int, out_dim: int, hidden: int | Sequence[int] | None = None, *,
                   final_norm: bool = False, final_bias: bool = True) -> nn.Module:
    """TuneVLSeg's ``get_mlp_projection``.

    Without ``hidden``: one ``Linear(in_dim, out_dim)`` (PyTorch's initialisation) and nothing
    else; ``final_norm`` and ``final_bias`` are then ignored, as in TuneVLSeg. With ``hidden``
    widths: ``Linear -> ReLU`` per hidden width, those Linear weights re-drawn with Kaiming-normal
    (ReLU gain), then a last ``Linear(hidden[-1], out_dim)`` (default initialisation) with a bias
    only when ``final_bias`` and not ``final_norm``, then ``LayerNorm(out_dim)`` (with a bias when
    ``final_bias``) if ``final_norm``."""
    if hidden is None:
        return nn.Linear(in_dim, out_dim)
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if not widths:
        raise ValueError("hidden: give at least one width, or None for a single linear layer")
    layers = nn.Sequential()
    for a, b in zip([in_dim, *widths[:-1]], widths):
        linear = nn.Linear(a, b)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers.extend([linear, nn.ReLU(inplace=True)])
    layers.append(nn.Linear(widths[-1], out_dim, bias=final_bias and not final_norm))
    if final_norm:
        layers.append(nn.LayerNorm(out_dim, bias=final_bias))
    return layers


def per_layer(layer: nn.Module, depth: int, unified: bool) -> nn.ModuleList:
    """The layers of ``depth`` prompt depths as TuneVLSeg lays them out: one module serving every
    depth when ``unified`` (TuneVLSeg repeats the same object; held once here, so a saved prompt
    holds its weights once), else ``depth`` deep copies that all start equal and train apart.
    Index with :func:`layer_at`."""
    return nn.ModuleList([layer] if unified else [copy.deepcopy(layer) for _ in range(depth)])


def layer_at(layers: nn.ModuleList, depth_index: int) -> nn.Module:
    """The module of prompt depth ``depth_index`` in a :func:`per_layer` list."""
    return layers[min(depth_index, len(layers) - 1)]
