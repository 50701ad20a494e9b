"""Decoupled DePT (Zhang et al., "DePT: Decoupled Prompt Tuning", CVPR 2024) on top of any prompt
learner. A different method from DePT, decomposed prompt tuning (Shi & Lipani, ICLR 2024; the
``dept`` learner), which shares its acronym.

The prompt learner inside (CoOp by default; any registered learner) is trained as usual, and beside
CLIP's similarity a second, "channel-adjusted transfer" head learns the base classes: a channel-wise
scale and shift of the image features and of the text features (each ``D`` scales starting at one
and ``D`` shifts at zero), then a linear classifier over the base classes. As in the reference code:

- in training the head sees the adjusted image features and the adjusted text features of each
  image's own class as a second example with the same label, and the loss is
  ``(1 - weight) * CE(clip) + weight * CE(head) + the inner learner's own loss``, ``weight = 0.7``;
- the head and the channel adjustments learn at ``head_lr_scale = 6.5`` times the prompt's rate;
- evaluated on the base classes the logits are ``(1 - weight) * clip + weight * head`` (the head's
  logits alone with ``fuse=False``); on other classes (base-to-novel, other datasets) CLIP's alone.

Where vlprompt differs: the reference decides which logits to give by the dataset split it is told
it evaluates (base, or any ImageNet variant); here the head scores whenever every class being
evaluated is one it learned, its rows picked by class name (the reference picks ImageNet-A/R's
rows the same way), so no split needs naming. Only the reference's linear head is offered (not its
``similarity`` variant).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.data.classnames import normalize_classname
from vlprompt.prompts.base import PromptLearner, PromptOutput, get_prompt_learner, register_prompt_learner

__all__ = ["DecoupledDePTPromptLearner"]

log = logging.getLogger(__name__)


@register_prompt_learner("decoupled_dept")
class DecoupledDePTPromptLearner(PromptLearner):
    """Decoupled DePT (Zhang et al., CVPR 2024): a prompt learner plus a channel-adjusted linear
    head for the base classes (see the module docstring).

    Args:
        backbone: the frozen encoder.
        classnames: the base classes (the head's classes).
        learner: the registered prompt learner inside (``coop``, ``kgcoop``, ``cocoop``, ``maple``, ...).
        learner_args: its keyword arguments.
        weight: the head's share of the loss and of the fused logits.
        head_lr_scale: the head's learning rate as a multiple of the optimiser's.
        fuse: evaluate the base classes with the fused logits (else with the head's alone).
        head_classnames: the classes the head scores; None: ``classnames``. (Saved prompts record
            them when the prompt was last pointed at other classes.)
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        learner: str = "coop",
        learner_args: dict[str, Any] | None = None,
        weight: float = 0.7,
        head_lr_scale: float = 6.5,
        fuse: bool = True,
        head_classnames: list[str] | None = None,
    ) -> None:
        super().__init__(backbone, classnames)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight is the head's share of the loss, in [0, 1]; got {weight}")
        inner = get_prompt_learner(learner)
        if inner is DecoupledDePTPromptLearner:
            raise ValueError("decoupled_dept needs another prompt learner inside (e.g. coop)")
        self.inner = inner(backbone, classnames, **(learner_args or {}))
        self.uses_image_tower = self.inner.uses_image_tower
        self.image_conditioned = self.inner.image_conditioned
        self.classnames = list(self.inner.classnames)
        self.weight, self.head_lr_scale, self.fuse = weight, head_lr_scale, fuse
        dim = backbone.embed_dim
        self.image_scale, self.image_shift = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.text_scale, self.text_shift = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self._set_head_classes(head_classnames or self.classnames)

    def _set_head_classes(self, classnames: Sequence[str]) -> None:
        """A new (untrained) linear head over ``classnames``."""
        old = getattr(self, "head", None)
        self.head_classnames = [normalize_classname(c) for c in classnames]
        self.head = nn.Linear(self.backbone.embed_dim, len(self.head_classnames))
        if old is not None:
            self.head.to(old.weight)
        self._head_rows = self._rows_for(self.classnames)

    def match_saved(self, config: dict[str, Any]) -> None:
        """A saved decoupled DePT prompt brings its head's classes (those it was trained on)."""
        if config.get("method") == self.name:
            head = config.get("hparams", {}).get("head_classnames") or config["classnames"]
            if [normalize_classname(c) for c in head] != self.head_classnames:
                self._set_head_classes(head)

    # -- saved with the head's classes -----------------------------------------------------------
    @property
    def hparams(self) -> dict[str, Any]:
        head = None if self.head_classnames == self.classnames else list(self.head_classnames)
        return {**self._hparams, "head_classnames": head}

    @hparams.setter
    def hparams(self, value: dict[str, Any]) -> None:
        self._hparams = value

    # -- class names -------------------------------------------------------------------------------
    def _build_class_buffers(self, classnames: list[str]) -> None:
        self.inner.set_classnames(classnames)
        self._head_rows = self._rows_for(classnames)

    def _rows_for(self, classnames: list[str]) -> list[int] | None:
        """The head's rows for ``classnames``; None when a class is not one it learned."""
        if list(classnames) == self.head_classnames:  # (also when a name recurs, as across tasks)
            return list(range(len(classnames)))
        index: dict[str, int] = {}
        for row, name in enumerate(self.head_classnames):
            index.setdefault(name, row)
        if not all(name in index for name in classnames):
            log.info("decoupled DePT: classes the head has not learned; scoring with the prompt alone")
            return None
        return [index[name] for name in classnames]

    @property
    def class_specific_ctx(self) -> bool:
        return bool(getattr(self.inner, "class_specific_ctx", False))

    # -- encoding ----------------------------------------------------------------------------------
    def image_prompts(self) -> tuple[list[torch.Tensor] | None, str]:
        return self.inner.image_prompts()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_images(images)

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.text_features(image_features)

    def _adjusted(self, features: torch.Tensor, scale: nn.Parameter, shift: nn.Parameter) -> torch.Tensor:
        return scale * features.to(scale.dtype) + shift

    def forward(
        self, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> PromptOutput:
        output = self.inner(images=images, image_features=image_features)
        if not self.training and self._head_rows is not None and output.logits is None:
            image = self._adjusted(output.image_features, self.image_scale, self.image_shift)
            output.head_logits = self.head(image)[:, self._head_rows]
            output.head_weight = self.weight if self.fuse else 1.0
        return output

    # -- training ----------------------------------------------------------------------------------
    @property
    def classification_weight(self) -> float:
        return 1.0 - self.weight

    def extra_loss(self, output: PromptOutput, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """``weight`` times the head's cross-entropy over the adjusted image features and the
        adjusted text features of each image's class (both labelled with it), plus the inner
        learner's own loss."""
        if self._head_rows != list(range(len(self.head_classnames))):
            raise ValueError(
                f"decoupled DePT trains its head on the classes it was built for ({len(self.head_classnames)}: "
                f"{', '.join(self.head_classnames[:3])}, ...); the prompt points at other classes "
                f"({', '.join(self.classnames[:3])}, ...). Build it with the training classes."
            )
        if output.text_features is None:
            raise ValueError(f"decoupled DePT needs text features; the {self.inner.name} prompt gives logits only")
        text = self._adjusted(output.text_features, self.text_scale, self.text_shift)
        text = text[labels] if text.dim() == 2 else text[torch.arange(len(labels), device=labels.device), labels]
        image = self._adjusted(output.image_features, self.image_scale, self.image_shift)
        head_loss = F.cross_entropy(self.head(torch.cat([text, image])), torch.cat([labels, labels]))
        inner = self.inner.extra_loss(output, logits, labels)
        loss = self.weight * head_loss
        return loss if inner is None else loss + inner

    def optimizer_groups(self, params: list[nn.Parameter]) -> list[Any]:
        """The inner learner's groups, and the head with the channel adjustments at
        ``head_lr_scale`` times the optimiser's rate."""
        own = {id(p) for p in (self.image_scale, self.image_shift, self.text_scale, self.text_shift,
                               *self.head.parameters())}
        groups = self.inner.optimizer_groups([p for p in params if id(p) not in own])
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        return [*groups, {"params": [p for p in params if id(p) in own], "lr_scale": self.head_lr_scale}]
