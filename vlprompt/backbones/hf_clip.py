"""Hugging Face ``transformers`` CLIP-family encoders behind the :class:`Backbone` API: ``CLIPModel``
and CLIPSeg (Lüddecke & Ecker, "Image Segmentation Using Text and Image Prompts", CVPR 2022;
``CLIPSegModel`` / ``CLIPSegForImageSegmentation``, e.g. ``CIDAS/clipseg-rd64-refined``).

Every prompt learner prompts these towers as it prompts open_clip's: text from token embeddings
with optional deep prompts (causal mask, pooled at the end-of-text token as the model pools;
exact truncation, chunking and shared-prefix encoding come from :class:`Backbone`), images with
optional visual prompts through the shared ViT block loop. CLIPSeg's decoder is not
part of the backbone: :meth:`HFCLIPBackbone.vlsm_decoder` hands it to the segmentation layer
(:class:`vlprompt.seg.HFCLIPSegHead`), which feeds it the prompted towers' layers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlprompt.backbones.base import Backbone
from vlprompt.backbones.prefix import blocks_support_prefix_cache
from vlprompt.backbones.registry import register_backbone
from vlprompt.backbones.text import TextTower
from vlprompt.backbones.vision import PromptPlacement, ViTTower, run_block_maybe_checkpointed

__all__ = ["HFCLIPBackbone", "HFCLIPTextTower"]

log = logging.getLogger(__name__)

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
#: PIL resampling codes (what Hugging Face image processors record) -> torchvision names.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_SUPPORTED = ("clip", "clipseg")


def _clip_of(model: nn.Module) -> nn.Module:
    """The CLIP part (text and vision towers with projections) of a CLIP or CLIPSeg model."""
    inner = getattr(model, "clip", model)  # CLIPSegForImageSegmentation keeps its CLIP at .clip
    for name in ("text_model", "vision_model", "text_projection", "visual_projection", "logit_scale"):
        if not hasattr(inner, name):
            raise NotImplementedError(
                f"{type(model).__name__} is not a transformers CLIP-family model (no .{name}); supported: "
                "CLIPModel, CLIPSegModel, CLIPSegForImageSegmentation")
    return inner


def _preprocess_from_processor(processor: Any) -> dict[str, Any]:
    """vlprompt's preprocess config from a Hugging Face image processor (ViTImageProcessor resizes
    to a fixed size; CLIPImageProcessor resizes the shortest edge and centre-crops)."""
    def field(size: Any, key: str) -> Any:  # a dict, or transformers 5's SizeDict
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    size, crop = processor.size, getattr(processor, "crop_size", None)
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if getattr(processor, "do_center_crop", False) and crop is not None:
        out_size, mode = (field(crop, "height"), field(crop, "width")), "shortest"
    elif field(size, "height") is not None:
        out_size, mode = (field(size, "height"), field(size, "width")), "squash"
    else:
        out_size, mode = field(size, "shortest_edge"), "shortest"
    if isinstance(out_size, tuple) and out_size[0] == out_size[1]:
        out_size = out_size[0]
    return {"size": out_size, "mean": tuple(processor.image_mean), "std": tuple(processor.image_std),
            "interpolation": _RESAMPLE.get(int(processor.resample), "bicubic"), "resize_mode": mode}


class HFCLIPTextTower(TextTower):
    """The text tower of a transformers ``CLIPModel`` / CLIPSeg: token and position embeddings,
    causal encoder layers, final layer norm, pooled at the end-of-text token, projected.
    Checkpoints from before transformers' PR #24773 record ``eos_token_id=2`` and pool at the
    largest token id (CLIP's end-of-text); newer ones pool at the first end-of-text id."""

    causal = True

    def __init__(self, clip: nn.Module, tokenizer: Any, owner: nn.Module) -> None:
        self.clip, self.tokenizer = clip, tokenizer
        #: the backbone whose ``grad_checkpointing`` the blocks follow
        self.owner = owner
        config = clip.text_model.config
        self.width = config.hidden_size
        self.context_length = config.max_position_embeddings
        self.embed_dim = clip.text_projection.out_features
        self.pool_type = "argmax" if config.eos_token_id == 2 else "eos"
        self.eos_id = config.eos_token_id
        self.prefix_cache = blocks_support_prefix_cache(self.blocks)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if hasattr(self.tokenizer, "pad_token_id"):  # a Hugging Face tokenizer
            return self.tokenizer(list(texts), padding="max_length", max_length=self.context_length,
                                  truncation=True, return_tensors="pt")["input_ids"]
        return self.tokenizer(list(texts))

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.text_model.embeddings.token_embedding(token_ids)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.clip.text_model.encoder.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.text_model.final_layer_norm.weight.dtype

    @property
    def grad_checkpointing(self) -> bool:
        return self.owner.grad_checkpointing

    def positions(self, length: int) -> torch.Tensor:
        return self.clip.text_model.embeddings.position_embedding.weight[:length]

    def causal_mask(self) -> torch.Tensor:
        weight = self.clip.text_model.final_layer_norm.weight
        size = self.context_length
        return torch.full((size, size), torch.finfo(weight.dtype).min, dtype=weight.dtype, device=weight.device).triu(1)

    def mask(self, token_ids: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        causal = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=token_ids.device).triu(1)
        return causal[None, None]

    def run_block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return block(x, mask)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.text_model.final_layer_norm(x)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.clip.text_projection(pooled)


class HFCLIPBackbone(Backbone):
    """A ``transformers`` CLIP or CLIPSeg model, frozen, behind the prompt-learning API.

    Args:
        model_name: a Hugging Face hub id (``CIDAS/clipseg-rd64-refined``, ``openai/clip-vit-base-patch16``)
            or a local folder saved with ``save_pretrained`` (``hf:`` in front is allowed). The
            hub needs the network or a filled Hugging Face cache; a folder works offline.
        image_size: input size in pixels (default: the image processor's, else the config's);
            CLIPSeg interpolates its position embeddings to any size (352 px in the paper).
        truncate_text: encode text only up to the longest end-of-text position (exact: the text
            tower is causal).
        grad_checkpointing: recompute the towers' block activations in the backward pass (whole
            text chunks with ``text_chunk_size``).
        text_chunk_size: encode at most this many prompts at a time (bounds text memory; same
            results up to float rounding). Not part of the backbone's identity.
        share_prefix: encode a prompt prefix shared by every class (start token and unified
            context) once and each class's suffix against its cached keys/values
            (:mod:`vlprompt.backbones.prefix`). Exact up to float rounding; turn it off only to
            measure its effect. Not part of the backbone's identity.
        compile_towers: compile the towers' blocks, the image tower and the shared-prefix
            functions with ``torch.compile`` (dynamic shapes). Not part of the backbone's identity.
        local_files_only: never reach the network (hub ids then need the cache).

    Use :meth:`from_model` for a model already in memory.
    """

    def __init__(
        self,
        model_name: str = "CIDAS/clipseg-rd64-refined",
        *,
        image_size: int | None = None,
        truncate_text: bool = True,
        grad_checkpointing: bool = False,
        text_chunk_size: int | None = None,
        share_prefix: bool = True,
        compile_towers: bool = False,
        local_files_only: bool = False,
    ) -> None:
        super().__init__()
        name = model_name.removeprefix("hf:")
        model = self._load_model(name, local_files_only)
        tokenizer, preprocess = self._load_processors(name, model, local_files_only)
        self._setup(model, tokenizer, preprocess, model_name, image_size, truncate_text=truncate_text,
                    grad_checkpointing=grad_checkpointing, text_chunk_size=text_chunk_size,
                    share_prefix=share_prefix, compile_towers=compile_towers)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Any | None = None,
        *,
        name: str = "in-memory",
        image_size: int | None = None,
        truncate_text: bool = True,
        grad_checkpointing: bool = False,
        text_chunk_size: int | None = None,
        share_prefix: bool = True,
        compile_towers: bool = False,
    ) -> HFCLIPBackbone:
        """Wrap a ``CLIPModel``/``CLIPSegModel``/``CLIPSegForImageSegmentation`` already in memory.
        ``tokenizer``: a Hugging Face tokenizer; None uses open_clip's CLIP BPE tokenizer (the same
        vocabulary as OpenAI CLIP's, so only for models with CLIP's 49,408-token vocabulary)."""
        self = cls.__new__(cls)
        Backbone.__init__(self)
        self._setup(model, tokenizer, None, name, image_size, truncate_text=truncate_text,
                    grad_checkpointing=grad_checkpointing, text_chunk_size=text_chunk_size,
                    share_prefix=share_prefix, compile_towers=compile_towers)
        return self

    # -- loading ---------------------------------------------------------------------------------
    @staticmethod
    def _load_model(name: str, local_files_only: bool) -> nn.Module:
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(name, local_files_only=local_files_only)
        except OSError as err:
            raise OSError(
                f"Could not load the transformers model {name!r}: {err}\nWithout internet, download it elsewhere "
                f"(`hf download {name} --local-dir DIR`) and pass the folder."
            ) from err
        if config.model_type not in _SUPPORTED:
            raise NotImplementedError(
                f"{name!r} is a {config.model_type!r} model; HFCLIPBackbone supports {', '.join(_SUPPORTED)} "
                "(open_clip models go through OpenCLIPBackbone)")
        kind = transformers.CLIPSegForImageSegmentation if config.model_type == "clipseg" else transformers.CLIPModel
        # SDPA takes the additive causal mask the prompted text loop builds (flash attention would not).
        return kind.from_pretrained(name, local_files_only=local_files_only, attn_implementation="sdpa")

    @staticmethod
    def _load_processors(name: str, model: nn.Module, local_files_only: bool) -> tuple[Any, dict[str, Any] | None]:
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
        except (OSError, ValueError) as err:
            log.warning("%s has no tokenizer files (%s); using open_clip's CLIP tokenizer", name, err)
            tokenizer = None
        try:
            preprocess = _preprocess_from_processor(
                transformers.AutoImageProcessor.from_pretrained(name, local_files_only=local_files_only))
        except (OSError, ValueError, AttributeError, KeyError) as err:
            log.warning("%s has no image processor config (%s); using the model type's defaults", name, err)
            preprocess = None
        return tokenizer, preprocess

    def _setup(self, model: nn.Module, tokenizer: Any | None, preprocess: dict[str, Any] | None, name: str,
               image_size: int | None, *, truncate_text: bool, grad_checkpointing: bool,
               text_chunk_size: int | None, share_prefix: bool, compile_towers: bool) -> None:
        clip = _clip_of(model)
        local = name.removeprefix("hf:")
        self.model_name = f"hf:{os.path.abspath(local)}" if os.path.isdir(local) else name
        self.pretrained = None
        self.model = clip
        decoder = getattr(model, "decoder", None)
        # Not registered: the segmentation layer takes the decoder over (and moves it with its module).
        self._decoder: tuple[nn.Module, list[int]] | None = (
            (decoder, list(model.config.extract_layers)) if decoder is not None else None)
        vision, config = clip.vision_model, clip.text_model.config
        if tokenizer is None:
            if config.vocab_size != 49408:
                raise ValueError(f"{name}: pass its tokenizer (vocabulary of {config.vocab_size} tokens, not CLIP's)")
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=config.max_position_embeddings)
        self.tokenizer = tokenizer
        self._set_text_tower(HFCLIPTextTower(clip, tokenizer, owner=self))
        self.embed_dim = self.text_tower.embed_dim
        self.truncate_text, self.share_prefix, self.text_chunk_size = truncate_text, share_prefix, text_chunk_size
        self._check_text_settings()
        self.grad_checkpointing = grad_checkpointing  # read by run_block_maybe_checkpointed(self, ...)

        embeddings = vision.embeddings
        self.vision_width, self.vision_layers = embeddings.embed_dim, len(vision.encoder.layers)
        patch = embeddings.patch_size if isinstance(embeddings.patch_size, int) else embeddings.patch_size[0]
        self._vision = ViTTower(
            width=self.vision_width,
            num_prefix_tokens=1,
            embed=lambda images: embeddings(images.to(embeddings.patch_embedding.weight.dtype)),
            pre_norm=vision.pre_layrnorm,
            blocks=vision.encoder.layers,
            run_block=lambda block, x: run_block_maybe_checkpointed(self, block, x, None),
            head=lambda x: clip.visual_projection(vision.post_layernorm(x[:, 0])),
            patch_size=(patch, patch),
        )
        is_seg = type(clip).__name__.startswith("CLIPSeg")
        mean, std = _IMAGENET if is_seg else _OPENAI_CLIP
        cfg = preprocess or {"size": vision.config.image_size, "mean": mean, "std": std,
                             "interpolation": "bilinear" if is_seg else "bicubic",
                             "resize_mode": "squash" if is_seg else "shortest"}
        if image_size is not None:
            cfg["size"] = image_size
        self._preprocess_cfg = cfg
        self.freeze()
        self.compile_towers = compile_towers
        self._compiled: dict[str, Any] = {}  # compiled shared-prefix functions, by name
        if compile_towers:
            self._compile_towers(vision)

    # -- images ----------------------------------------------------------------------------------
    def encode_image(
        self,
        images: torch.Tensor,
        visual_prompts: Sequence[torch.Tensor] | None = None,
        placement: PromptPlacement = "after_cls",
    ) -> torch.Tensor:
        if visual_prompts is None:
            out = self.model.get_image_features(pixel_values=images)
            return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output
        self.check_visual_prompts(len(visual_prompts))
        return self._vision.encode(images, visual_prompts, placement)

    def vlsm_decoder(self) -> tuple[nn.Module, list[int]] | None:
        """CLIPSeg's own decoder and the (0-based) vision blocks it reads, when the weights are
        CLIPSeg's; None for plain CLIP."""
        return self._decoder

    # -- scoring, identity -----------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        return dict(self._preprocess_cfg)

    @property
    def identity(self) -> dict[str, Any]:
        text, vision = self.model.text_model, self.model.vision_model
        return {
            "type": type(self).__name__,
            "name": self.model_name,
            "pretrained": None,
            "text_width": self.text_width,
            "vision_width": self.vision_width,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "text_layers": self.text_layers,
            "vision_layers": self.vision_layers,
            "fingerprint": self.fingerprint([
                text.embeddings.position_embedding.weight, text.final_layer_norm.weight, self.model.logit_scale,
                vision.post_layernorm.weight, self.model.visual_projection.weight]),
        }


def _load(name: str, pretrained: str | None) -> HFCLIPBackbone:
    """``hf:ID_OR_FOLDER`` for :func:`~vlprompt.backbones.load_backbone`: the weights come with the model."""
    if pretrained:
        raise ValueError(f"{name}: a transformers model brings its own weights; drop pretrained={pretrained!r}")
    return HFCLIPBackbone(name)


register_backbone("hf_clip", HFCLIPBackbone, prefix="hf:", load=_load)
