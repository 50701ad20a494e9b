"""The prompt-learner contract and the registry every method is listed in."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.data.classnames import normalize_classname

__all__ = [
    "PROMPT_LEARNERS",
    "PromptLearner",
    "PromptLearnerFactory",
    "PromptOutput",
    "get_prompt_learner",
    "prompt_tokens",
    "register_prompt_learner",
]

log = logging.getLogger(__name__)


@dataclass
class PromptOutput:
    """What a prompt learner hands the method: features in the joint space (not normalised).

    ``text_features`` is ``[C, D]`` (one classifier for the batch) or ``[B, C, D]``
    (per-image classifiers, e.g. CoCoOp). Learners with a learned head (VPT on a vision-only
    encoder) give ``logits`` directly. A second head scored beside CLIP's similarity (decoupled
    DePT) gives ``head_logits`` and its weight ``head_weight`` in the fused logits. ``extras``
    carries what a learner's own loss needs (e.g. PromptSRC's frozen image features).
    """

    image_features: torch.Tensor | None
    text_features: torch.Tensor | None
    logits: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    head_logits: torch.Tensor | None = None
    head_weight: float = 0.0


class PromptLearner(nn.Module):
    """Base class: owns learnable prompt tensors, builds prompts, asks the backbone to encode.

    Subclasses take ``(backbone, classnames)`` positionally and their hyper-parameters as
    keyword-only arguments. The arguments of the concrete constructor are recorded once, by the
    base class, in :attr:`hparams` (defaults filled in), so a saved prompt rebuilds with exactly
    them; subclasses never list them again. Fixed token buffers are non-persistent: the state
    dict holds only the learnable tensors.
    """

    name: ClassVar[str] = ""
    #: True when the learner changes how images are encoded (visual prompts). Image features
    #: can be cached only for learners that leave the image tower untouched.
    uses_image_tower: ClassVar[bool] = False
    #: True when text features depend on the image (CoCoOp): ``text_features`` is ``[B, C, D]``.
    image_conditioned: ClassVar[bool] = False

    #: The concrete constructor's keyword arguments (hyper-parameters), recorded at construction.
    hparams: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            cls.__init__ = _recording_hyperparameters(init)

    def __init__(self, backbone: Backbone, classnames: Sequence[str]) -> None:
        super().__init__()
        # Held by reference, not registered: the frozen encoder belongs to the method and must
        # never end up in a saved prompt.
        object.__setattr__(self, "backbone", backbone)
        self.classnames: list[str] = []

    # -- class names ---------------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Point the prompt at a new list of classes (e.g. novel classes) without touching the
        learned tensors. Names are normalised as the reference implementations do
        (``golden_retriever`` -> ``golden retriever``)."""
        names = [normalize_classname(c) for c in classnames]
        if not names:
            raise ValueError("set_classnames needs at least one class name")
        if any(not n for n in names):
            raise ValueError(f"empty class name in {list(classnames)!r}")
        self.classnames = names
        self._build_class_buffers(names)

    def _build_class_buffers(self, classnames: list[str]) -> None:
        """Rebuild whatever fixed tensors depend on the class names."""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    # -- encoding ------------------------------------------------------------------------------
    def image_prompts(self) -> tuple[list[torch.Tensor] | None, str]:
        """The visual prompts this learner puts into the image tower and where (a
        :data:`~vlprompt.backbones.PromptPlacement`); ``(None, "after_cls")`` for learners that
        leave images alone. The one place a learner states its visual prompts:
        :meth:`encode_images` and the intermediate layers a segmentation decoder reads both use it."""
        return None, "after_cls"

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image features for this prompt (plain encoder unless the learner prompts images)."""
        prompts, placement = self.image_prompts()
        if prompts is None:
            return self.backbone.encode_image(images)
        return self.backbone.encode_image(images, prompts, placement)

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Class text features ``[C, D]`` (or ``[B, C, D]`` if :attr:`image_conditioned`)."""
        raise NotImplementedError

    def forward(
        self, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> PromptOutput:
        """Encode ``images`` (or take precomputed ``image_features``) and the class prompts."""
        if image_features is None and images is not None:
            image_features = self.encode_images(images)
        return PromptOutput(image_features=image_features, text_features=self.text_features(image_features))

    def extra_loss(self, output: PromptOutput, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Method-specific regulariser added to the cross-entropy (None when there is none)."""
        return None

    @property
    def classification_weight(self) -> float:
        """Weight of the cross-entropy of the logits in the training loss (the rest of the loss
        is :meth:`extra_loss`): 1, except for learners that share it with a head of their own."""
        return 1.0

    def optimizer_groups(self, params: list[nn.Parameter]) -> list[Any]:
        """What the optimiser is built over: ``params`` as they are, or parameter groups with their
        own settings (DePT's low-rank learning rate; ``lr_scale``: a multiple of the optimiser's
        learning rate)."""
        return params

    # -- bookkeeping ---------------------------------------------------------------------------
    def match_saved(self, config: dict[str, Any]) -> None:
        """Before a saved prompt's tensors are loaded into this learner (``config``: its ``method``,
        ``hparams`` and ``classnames``), take over what their shapes follow from the saved settings
        rather than from this learner's classes (decoupled DePT's head classes). Nothing to do by
        default."""

    def num_learnable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"classes={self.num_classes}, {args}"


def _recording_hyperparameters(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a learner's ``__init__`` so that the outermost call (the concrete class's constructor)
    records its bound keyword arguments, defaults included, as ``hparams``; the ``super().__init__``
    calls it makes on the way down record nothing."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: PromptLearner, *args: Any, **kwargs: Any) -> None:
        if self.__dict__.get("_recording_hparams"):
            init(self, *args, **kwargs)
            return
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        hparams: dict[str, Any] = {}
        for key, value in list(bound.arguments.items())[3:]:  # after self, backbone, classnames
            if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
                hparams.update(value)
            else:
                hparams[key] = value
        object.__setattr__(self, "_recording_hparams", True)
        try:
            init(self, *args, **kwargs)
        finally:
            del self.__dict__["_recording_hparams"]
        self.hparams = hparams

    return wrapper


def prompt_tokens(*shape: int, std: float = 0.02) -> nn.Parameter:
    """Learnable prompt tokens drawn from N(0, std^2), the initialisation of VPT-style prompts
    in MaPLe/IVLP/PromptSRC."""
    return nn.Parameter(torch.randn(*shape) * std)


PromptLearnerFactory = Callable[[Backbone, Sequence[str]], PromptLearner]

PROMPT_LEARNERS: dict[str, type[PromptLearner]] = {}

_L = TypeVar("_L", bound=type[PromptLearner])


def register_prompt_learner(name: str) -> Callable[[_L], _L]:
    """Class decorator listing a prompt learner under ``name`` (used by saved prompts, configs
    and the generic contract tests)."""

    def wrap(cls: _L) -> _L:
        if name in PROMPT_LEARNERS and PROMPT_LEARNERS[name] is not cls:
            raise ValueError(f"prompt learner name {name!r} already registered")
        cls.name = name
        PROMPT_LEARNERS[name] = cls
        return cls

    return wrap


def get_prompt_learner(name: str) -> type[PromptLearner]:
    try:
        return PROMPT_LEARNERS[name]
    except KeyError:
        raise KeyError(f"unknown prompt learner {name!r}; registered: {sorted(PROMPT_LEARNERS)}") from None
