"""timm Vision Transformers as vision-only backbones (VPT with a learned head; segmentation)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from vlprompt.backbones.base import Backbone
from vlprompt.backbones.registry import register_backbone
from vlprompt.backbones.vision import PromptPlacement, vit_tower

__all__ = ["TimmBackbone"]


class TimmBackbone(Backbone):
    """A frozen timm ViT image encoder without a text tower.

    It has no text tower (``text_tower is None``): prompt learners that need class text (CoOp,
    MaPLe, ...) refuse it with the clear error of :meth:`Backbone.require_text`; VPT runs on it
    with a learned linear head (the setting of the VPT paper).

    Args:
        model_name: a timm model name, e.g. ``vit_base_patch16_224.augreg_in21k``.
        pretrained: None (random weights), ``"timm"`` (timm's own pretrained weights; needs the
            Hugging Face hub or its cache) or a local checkpoint file (safetensors or a
            weights-only torch file) for ``model_name``.
        model_kwargs: extra arguments for ``timm.create_model`` (``img_size``, ``depth`` ...).
        grad_checkpointing: recompute activations in the backward pass (timm's
            ``set_grad_checkpointing``, honoured by the prompted block loop): less memory.
    """

    #: No text tower: ``has_text`` is False and the text methods raise ``require_text``'s error.
    text_tower = None

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        pretrained: str | None = None,
        *,
        model_kwargs: dict[str, Any] | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        import timm

        kwargs = dict(model_kwargs or {})
        kwargs["num_classes"] = 0  # features, not the pre-training classifier
        if pretrained and pretrained != "timm":
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained={pretrained!r}: no such checkpoint file")
            kwargs["pretrained_cfg_overlay"] = {"file": pretrained}
        try:
            model = timm.create_model(model_name, pretrained=bool(pretrained), **kwargs)
        except (RuntimeError, OSError) as err:
            if pretrained == "timm":
                raise RuntimeError(
                    f"Could not fetch timm weights for {model_name!r}: {err}. Without internet, pass the "
                    "path of a downloaded checkpoint as `pretrained`."
                ) from err
            raise
        self.model = model
        self.model_name = model_name
        self.pretrained = pretrained
        self.model_kwargs = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
        self._vision = vit_tower(model)  # raises for non-ViT timm models
        self.vision_width = self._vision.width
        self.vision_layers = self._vision.layers
        self.embed_dim = model.num_features
        self._preprocess_cfg = self._read_preprocess_cfg()
        self.grad_checkpointing = grad_checkpointing
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.freeze()

    def _read_preprocess_cfg(self) -> dict[str, Any]:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=self.model)
        # The size the model was built for (img_size=...), which its pretrained config may not know.
        size = tuple(getattr(self.model.patch_embed, "img_size", None) or cfg["input_size"][1:])
        return {
            "size": tuple(size) if size[0] != size[1] else size[0],
            "mean": tuple(cfg["mean"]),
            "std": tuple(cfg["std"]),
            "interpolation": cfg.get("interpolation", "bicubic"),
            "resize_mode": "shortest",
        }

    # -- images ------------------------------------------------------------------------------
    def encode_image(
        self,
        images: torch.Tensor,
        visual_prompts: Sequence[torch.Tensor] | None = None,
        placement: PromptPlacement = "after_cls",
    ) -> torch.Tensor:
        if visual_prompts is None:
            return self.model(images)
        self.check_visual_prompts(len(visual_prompts))
        return self._vision.encode(images, visual_prompts, placement)

    @property
    def logit_scale(self) -> torch.Tensor:
        """1: a vision-only encoder has no contrastive temperature; learned heads give logits."""
        return torch.ones((), device=self.device)

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        return dict(self._preprocess_cfg)

    @property
    def identity(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "name": self.model_name,
            "pretrained": self.pretrained,
            "vision_width": self.vision_width,
            "vision_layers": self.vision_layers,
            "embed_dim": self.embed_dim,
            "fingerprint": self.fingerprint(list(self.model.parameters())[:2]),
        }


register_backbone("timm", TimmBackbone, prefix="timm:",
                  load=lambda name, pretrained: TimmBackbone(name.removeprefix("timm:"), pretrained))
