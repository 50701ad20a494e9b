"""GRAM's gradient-regulating function (Li et al., "Gradient-Regulated Meta-Prompt Learning for
Generalizable Vision-Language Models", ICCV 2023), as vlprompt reads it.

The paper describes a lightweight function, meta-learned with the prompt initialisation, that turns
the raw fine-tuning gradient of the soft prompt into a direction that also serves other domains. It
releases no code and leaves its form open; vlprompt's choices, each made so that one regulator
serves every prompt learner:

- **Shape-agnostic.** It acts on each element of a prompt gradient ``G`` (``[..., n, D]``: ``n``
  tokens of width ``D``), from features that do not depend on the width: the element relative to
  its token's gradient scale ``g / rms(G_token)``, the prompt value relative to its token's scale
  ``p / rms(P_token)``, and the token's share of the tensor's gradient ``log(rms(G_token) / rms(G))``.
  So the same regulator serves CoOp contexts (text width), VPT deep prompts (vision width) and
  IVLP/MaPLe (both).
- **A modulation, not a new gradient.** A small MLP (3 -> ``hidden`` -> 1) gives each element a factor
  ``m = 2 sigmoid(MLP(features))`` in (0, 2); the transformed gradient is ``m * G``. Its last layer
  starts at zero, so ``m = 1``: a fresh regulator is the identity.
- **Gated.** The output mixes the raw and the transformed gradient, ``(1 - a) G + a m G``, with a
  learned gate ``a = sigmoid(w)`` (starts at 0.5).
- **Norm-preserving.** The result is rescaled to the norm of ``G`` (per prompt tensor): the regulator
  chooses the direction, the learning rate keeps the step size. It is also scale-equivariant
  (``R(cG) = c R(G)``), so gradient scaling under mixed precision does not change what it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["GradientRegulator", "load_regulator", "save_regulator"]

REGULATOR_NAME = "regulator.safetensors"
_EPS = 1e-12


def _rms(x: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    if dim is None:
        return x.pow(2).mean().add(_EPS).sqrt()
    return x.pow(2).mean(dim=dim, keepdim=True).add(_EPS).sqrt()


class GradientRegulator(nn.Module):
    """``R(G, P)``: the regulated gradient of a prompt tensor ``P`` (same shape and norm as ``G``).

    Args:
        hidden: width of the MLP that gives each element its modulation.
    """

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.hidden = hidden
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.gate = nn.Parameter(torch.zeros(()))

    def features(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """The width-free features ``[..., 3]`` of every element (see the module docstring)."""
        g = grad.reshape(-1, grad.shape[-1]) if grad.dim() > 1 else grad.reshape(1, -1)
        p = param.reshape(g.shape).to(g.dtype)
        token_scale = _rms(g)
        share = torch.log(token_scale / _rms(g, None)).expand_as(g)
        return torch.stack([g / token_scale, p / _rms(p), share], dim=-1)

    def forward(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        modulation = 2 * torch.sigmoid(self.mlp(self.features(grad, param)).squeeze(-1)).reshape(grad.shape)
        a = torch.sigmoid(self.gate)
        mixed = (1 - a) * grad + a * modulation * grad
        return mixed * (grad.norm() / mixed.norm().clamp_min(_EPS))

    def layout(self) -> dict[str, Any]:
        return {"regulator": "gram-elementwise-v1", "hidden": self.hidden}


def save_regulator(regulator: GradientRegulator, directory: str | Path) -> Path:
    """Write ``regulator.safetensors`` (with its layout) into a saved prompt's directory."""
    from safetensors.torch import save_file

    path = Path(directory) / REGULATOR_NAME
    state = {k: v.detach().cpu().contiguous() for k, v in regulator.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in regulator.layout().items()})
    return path


def load_regulator(directory: str | Path) -> GradientRegulator:
    """The regulator saved with a GRAM meta-prompt (no pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(directory) / REGULATOR_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no gradient regulator ({REGULATOR_NAME}); is it a GRAM meta-prompt "
                                "saved with regulate=True?")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("regulator") != "gram-elementwise-v1":
        raise ValueError(f"{path}: unknown regulator layout {meta.get('regulator')!r}")
    regulator = GradientRegulator(hidden=int(meta["hidden"]))
    regulator.load_state_dict(load_file(str(path)))
    return regulator.requires_grad_(False)
