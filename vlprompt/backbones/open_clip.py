"""open_clip encoders (``CLIP`` and ``CustomTextCLIP`` layouts) behind the :class:`Backbone` API."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import open_clip
import torch
from torch import nn

from vlprompt.backbones.base import Backbone
from vlprompt.backbones.prefix import blocks_support_prefix_cache
from vlprompt.backbones.registry import register_backbone
from vlprompt.backbones.resnet import resnet_tower
from vlprompt.backbones.text import TextTower, check_deep_prompt_depth, splice_prompt
from vlprompt.backbones.vision import PromptPlacement, ViTTower, vit_tower

__all__ = ["OpenCLIPBackbone", "OpenCLIPTextTower", "TransformersTextTower", "hf_text_encoder", "open_clip_text_tower"]

log = logging.getLogger(__name__)


def _text_source(model: nn.Module) -> tuple[nn.Module, str, int | None]:
    """The module holding an open_clip TextTransformer's pieces, its pool type and EOS id."""
    text = getattr(model, "text", None)
    if hasattr(model, "token_embedding"):  # CLIP layout: the text tower is flattened onto the model
        return model, model.text_pool_type, getattr(model, "text_eos_id", None)
    if text is not None and hasattr(text, "token_embedding"):  # CustomTextCLIP + TextTransformer
        return text, text.pool_type, getattr(text, "eos_id", None)
    raise NotImplementedError(
        f"{type(model).__name__} has a text tower of type {type(text).__name__}, which vlprompt cannot "
        "prompt yet. Supported: open_clip CLIP and CustomTextCLIP models with an open_clip "
        "TextTransformer (OpenAI CLIP, LAION, DataComp, MetaCLIP, SigLIP, EVA ...)."
    )


class OpenCLIPTextTower(TextTower):
    """open_clip's ``TextTransformer``, flattened onto a ``CLIP`` model or at ``model.text``
    (``CustomTextCLIP``, ``CoCa``): causal when it has an attention mask (SigLIP's is not),
    padding masked when the model asks for it, CoCa's class token appended after the text and
    pooled. Every piece is read from the model when used, so ``.to()`` and copies stay in step."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        source, pool_type, eos_id = _text_source(model)
        self.source, self.tokenizer = source, tokenizer
        self.width = source.token_embedding.embedding_dim
        self.context_length = source.positional_embedding.shape[0]
        self.pool_type = "last" if self.appended_token is not None else pool_type
        self.eos_id = eos_id
        self.causal = source.attn_mask is not None
        self.embed_dim = self._projected_width()
        self.prefix_cache = blocks_support_prefix_cache(self.blocks)

    def _projected_width(self) -> int:
        proj = self.source.text_projection
        if isinstance(proj, nn.Linear):
            return proj.out_features
        if isinstance(proj, torch.Tensor):
            return proj.shape[1]
        return self.width

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.source.token_embedding(token_ids)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.source.transformer.resblocks

    @property
    def dtype(self) -> torch.dtype:
        return self.source.transformer.get_cast_dtype()

    @property
    def grad_checkpointing(self) -> bool:
        return getattr(self.source.transformer, "grad_checkpointing", False)

    @property
    def appended_token(self) -> torch.Tensor | None:
        return getattr(self.source, "cls_emb", None)

    def positions(self, length: int) -> torch.Tensor:
        return self.source.positional_embedding[:length]

    def causal_mask(self) -> torch.Tensor:
        return self.source.attn_mask

    def mask(self, token_ids: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        attn_mask = self.source.attn_mask
        attn_mask = attn_mask[:length, :length] if attn_mask is not None else None
        if getattr(self.source, "use_pad_mask", False) or self.appended_token is not None:
            pad_mask = self._padding_mask(token_ids, length, dtype)
            attn_mask = pad_mask if attn_mask is None else attn_mask.unsqueeze(0) + pad_mask
        return attn_mask

    def _padding_mask(self, token_ids: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        valid = token_ids != getattr(self.source, "pad_id", 0)
        if self.appended_token is not None:
            # The class token's key column: at the end, or (open_clip's legacy order, which the
            # released CoCa weights were trained with) in front, shifting the padding columns by one.
            ones = valid.new_ones(valid.shape[0], 1)
            valid = torch.cat([valid, ones] if getattr(self.source, "correct_cls_mask", False) else [ones, valid], dim=1)
        additive = torch.zeros(valid.shape[0], length, length, dtype=dtype, device=token_ids.device)
        additive.masked_fill_(~valid[:, None, :], float("-inf"))
        return additive.repeat_interleave(self.blocks[0].attn.num_heads, 0)

    def run_block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if getattr(self.source.transformer, "batch_first", True):
            return block(x, attn_mask=mask)
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.ln_final(x)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = self.source.text_projection
        if isinstance(proj, nn.Module):
            return proj(pooled)
        return pooled @ proj if proj is not None else pooled

    def identity_weights(self) -> list[torch.Tensor]:
        """A few text weights for the backbone's fingerprint."""
        return [self.source.positional_embedding, self.source.ln_final.weight]


class TransformersTextTower(TextTower):
    """open_clip's ``HFTextEncoder`` (a transformers encoder as the text tower: RoBERTa, XLM-R,
    MT5, NLLB): bidirectional, padding masked, pooled by the encoder's pooler. The transformers
    model runs itself (its position ids and masks are those of the plain text), see :meth:`encode`."""

    causal = False

    def __init__(self, encoder: nn.Module, tokenizer: Any) -> None:
        self.encoder, self.tokenizer = encoder, tokenizer
        self.width = encoder.transformer.get_input_embeddings().embedding_dim
        self.context_length = tokenizer.context_length
        self.pool_type = _HF_POOLS.get(type(encoder.pooler).__name__, type(encoder.pooler).__name__)
        self.embed_dim = encoder.output_dim

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.transformer.get_input_embeddings()(token_ids)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return _hf_layers(self.encoder.transformer)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.transformer.get_input_embeddings().weight.dtype

    def encode(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        pooled_at: torch.Tensor | None,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
        checkpoint_blocks: bool = True,
    ) -> torch.Tensor:
        """``HFTextEncoder.forward`` from embeddings: the encoder runs on the token ids, so its
        position ids (RoBERTa's padding-aware ones, NLLB's sinusoids) and attention mask are
        exactly those of the plain text, and a hook hands it ``embeddings`` in place of its own
        lookup of the ids; deep prompts replace tokens at the entry of layers ``1..n``."""
        encoder = self.encoder
        transformer = encoder.transformer
        mask = (token_ids != encoder.config.pad_token_id).long()
        layers = self.blocks
        deep_prompts = list(deep_prompts or [])
        check_deep_prompt_depth(len(deep_prompts), len(layers))
        embed = transformer.get_input_embeddings()
        handles = [embed.register_forward_hook(lambda module, args, out: embeddings.to(out.dtype))]
        for layer, prompt in zip(layers[1:], deep_prompts):
            hook = partial(_splice_hidden_states, prompt=prompt, start=prompt_start)
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            out = transformer(input_ids=token_ids, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
        return encoder.proj(encoder.pooler(out, mask))

    def identity_weights(self) -> list[torch.Tensor]:
        """A text weight for the backbone's fingerprint."""
        return [list(self.encoder.transformer.parameters())[-1]]

    def encode_tokens(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Not offered: the transformers encoder runs itself and pools inside (CRIS's word
        features need a CLIP text transformer)."""
        raise NotImplementedError(f"per-token text features of a transformers text tower "
                                  f"({type(self.encoder.transformer).__name__}) are not supported; CRIS needs a "
                                  "CLIP text transformer")


def open_clip_text_tower(model: nn.Module, tokenizer: Any) -> TextTower:
    """The text tower adapter for an open_clip model (its own TextTransformer, or a transformers
    encoder); ``NotImplementedError`` naming what is supported otherwise."""
    hf = hf_text_encoder(model)
    return TransformersTextTower(hf, tokenizer) if hf is not None else OpenCLIPTextTower(model, tokenizer)


def _load_tokenizer(model_name: str, tokenizer: str | None) -> Any:
    """open_clip's tokenizer for ``model_name``, or the Hugging Face tokenizer ``tokenizer`` with
    the model's context length and tokenizer options."""
    if tokenizer is None:
        try:
            return open_clip.get_tokenizer(model_name)
        except OSError as err:  # transformers could not reach or find the tokenizer files
            raise OSError(
                f"Could not load the tokenizer of {model_name!r}: {err}. open_clip fetches it from the "
                "Hugging Face hub; offline, pass a local copy as OpenCLIPBackbone(..., tokenizer=FOLDER)."
            ) from err
    from open_clip.factory import get_model_config, parse_model_name

    schema, identifier = parse_model_name(model_name)
    text_cfg = (get_model_config(identifier) or {}).get("text_cfg", {}) if schema is None else {}
    return open_clip.tokenizer.HFTokenizer(
        tokenizer,
        context_length=text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH),
        **text_cfg.get("tokenizer_kwargs", {}),
    )


def hf_text_encoder(model: nn.Module) -> nn.Module | None:
    """open_clip's ``HFTextEncoder`` (a transformers encoder as the text tower), or None."""
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    return text if isinstance(text, HFTextEncoder) else None


def _hf_layers(transformer: nn.Module) -> nn.ModuleList:
    """The transformer layers of a transformers encoder (BERT/RoBERTa/XLM-R ``encoder.layer``,
    T5/MT5 encoder ``block``, M2M100/NLLB encoder ``layers``)."""
    for path in ("encoder.layer", "block", "layers", "encoder.layers"):
        module = transformer
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise NotImplementedError(f"cannot find the layers of the {type(transformer).__name__} text encoder")


_HF_POOLS = {"MeanPooler": "mean", "MaxPooler": "max", "ClsPooler": "first", "ClsLastHiddenStatePooler": "first"}


@contextlib.contextmanager
def _quiet_missing_weights(active: bool) -> Iterator[None]:
    """Drop open_clip's warning that a model was initialised randomly (it logs through the root
    logger) while ``active``: the weights are loaded after it is built."""
    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _fetch_failure(model: str, tag: str, err: Exception) -> str:
    """What to do when an open_clip pretrained tag's weights could not be fetched (no internet, or
    not in the cache): where they come from, where the cache is, how to carry it."""
    from huggingface_hub import constants

    source = open_clip.get_pretrained_cfg(model, tag)
    where = (f"the Hugging Face hub repo {source['hf_hub'].rstrip('/')}" if source.get("hf_hub")
             else source.get("url") or "its download address")
    return (
        f"could not fetch the weights of open_clip tag {tag!r} for {model!r} from {where} ({err}). Without internet: "
        f"load it once on a machine with internet (open_clip.create_model({model!r}, pretrained={tag!r})), copy its "
        f"Hugging Face cache (HF_HOME, here {constants.HF_HOME}) to this machine and set HF_HUB_OFFLINE=1; or pass "
        "the checkpoint file itself as pretrained"
    )


class OpenCLIPBackbone(Backbone):
    """Any open_clip model, frozen, behind the prompt-learning API.

    Args:
        model_name: an open_clip model name (``ViT-B-16``), ``local-dir:/path`` (a folder with
            ``open_clip_config.json`` and weights), or ``zoo:NAME`` for an embedded model that
            ships with vlprompt (see :mod:`vlprompt.zoo`).
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k`` ...), a local
            checkpoint file, or None for random weights (tests).
        precision: weights precision passed to open_clip; mixed precision is Lightning's job.
        truncate_text: encode text only up to the longest pooled (EOT) position of the batch when
            the text tower is causal. Exact; turn it off only to measure its effect.
        grad_checkpointing: recompute the towers' activations in the backward pass instead of
            storing them (the model's own ``set_grad_checkpointing``, honoured by vlprompt's
            prompted block loops too): much less memory for deep prompts on ViT-L/H, same
            results, about a third more compute. Not part of the backbone's identity.
        text_chunk_size: encode at most this many prompts at a time, each chunk truncated to its own
            longest pooled position, and with ``grad_checkpointing`` keep only each chunk's inputs
            for the backward pass (one chunk's activations are recomputed at a time). Bounds text
            memory when many classes are encoded together (multitask training over the union of
            classes of all tasks). Same results up to float rounding (chunks sum in another
            order); None encodes all prompts at once. Not part of the backbone's identity.
        share_prefix: on causal towers, encode a prompt prefix shared by every class (start token
            and unified context) once, and each class's suffix against its cached keys/values,
            grouped by length (:mod:`vlprompt.backbones.prefix`). Exact; turn it off only to
            measure its effect. Not part of the backbone's identity.
        compile_towers: compile the frozen towers' blocks (text and image) and the shared-prefix
            suffix encoder with ``torch.compile`` (dynamic shapes). Off by default: the first steps
            pay the compilation (tens of seconds per tower on CPU, recompiling for new shapes),
            later ones run faster (``benchmarks/coop_step.py --compile`` measures both). Same
            results to float precision. Not part of the backbone's identity.
        tokenizer: a Hugging Face tokenizer (hub id or local folder, e.g. one saved with
            ``save_pretrained``) to use instead of the one open_clip names for this model. Models
            whose tokenizer open_clip fetches from the hub (SigLIP, SigLIP2, CLIPA, MetaCLIP 2,
            the RoBERTa/XLM-R/MT5/NLLB text towers) then work offline. The model's context
            length and tokenizer options are kept.

    Models with a Hugging Face text tower build it from the transformers config named in their
    open_clip config (a hub id, or a local folder for ``local-dir:`` models); its own pretrained
    weights are never fetched separately: they come with ``pretrained`` (random without it).
    """

    def __init__(
        self,
        model_name: str = "zoo:shapeworld-clip-tiny",
        pretrained: str | None = None,
        *,
        precision: str = "fp32",
        truncate_text: bool = True,
        grad_checkpointing: bool = False,
        text_chunk_size: int | None = None,
        share_prefix: bool = True,
        compile_towers: bool = False,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        from vlprompt.zoo import resolve_model_name, shared_tower_weights

        if text_chunk_size is not None and text_chunk_size < 1:
            raise ValueError(f"text_chunk_size must be a positive number of prompts or None, got {text_chunk_size}")
        resolved = resolve_model_name(model_name)
        if not resolved.startswith(("local-dir:", "hf-hub:")) and resolved not in open_clip.list_models():
            import difflib

            close = difflib.get_close_matches(resolved, open_clip.list_models(), n=5, cutoff=0.5)
            raise ValueError(
                f"unknown open_clip model {model_name!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + " (open_clip.list_models() lists them; `zoo:NAME` for an embedded model, `local-dir:/folder` "
                "for a local one)"
            )
        if pretrained and not resolved.startswith(("local-dir:", "hf-hub:")) and not os.path.isfile(pretrained):
            known = list(open_clip.list_pretrained_tags_by_model(resolved))
            if pretrained not in known:
                raise ValueError(
                    f"pretrained={pretrained!r} is neither a file nor a known open_clip tag for "
                    f"{resolved!r} (known tags: {known or 'none'})."
                )
        try:
            shared = shared_tower_weights(model_name)  # an embedded model that borrows another's text tower
            with _quiet_missing_weights(shared is not None):  # loaded right below
                model = open_clip.create_model(
                    resolved, pretrained=pretrained, precision=precision, pretrained_image=False, pretrained_hf=False,
                    load_weights=shared is None,
                )
            if shared is not None:
                model.load_state_dict(shared)
        except RuntimeError as err:
            if pretrained and not os.path.isfile(pretrained):
                # open_clip says "not a known tag" also when a known tag's download failed
                raise RuntimeError(_fetch_failure(resolved, pretrained, err)) from err
            raise
        except OSError as err:  # transformers could not fetch a Hugging Face text tower's config
            raise OSError(
                f"Could not build the Hugging Face text tower of {resolved!r}: {err}. open_clip reads its "
                "transformers config from the hub; offline, use `local-dir:/folder` whose open_clip_config.json "
                "names a local copy in text_cfg.hf_model_name (and holds the tokenizer files)."
            ) from err
        self._setup(model, _load_tokenizer(resolved, tokenizer), model_name, pretrained, truncate_text=truncate_text,
                    grad_checkpointing=grad_checkpointing, text_chunk_size=text_chunk_size, share_prefix=share_prefix,
                    compile_towers=compile_towers)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any | None = None, *, name: str = "in-memory",
                   pretrained: str | None = None, truncate_text: bool = True, grad_checkpointing: bool = False,
                   text_chunk_size: int | None = None, share_prefix: bool = True,
                   compile_towers: bool = False) -> OpenCLIPBackbone:
        """Wrap an open_clip model already in memory (fine-tuned, built by hand ...). ``tokenizer``:
        the model's (``open_clip.get_tokenizer(name)``); None uses open_clip's default CLIP BPE
        tokenizer at the model's context length. ``name`` and ``pretrained`` are recorded in the
        backbone's identity (a saved prompt then names them); the weights' fingerprint is what
        tells two models apart. The model is frozen in place (``requires_grad=False``, eval mode)."""
        if tokenizer is None:
            if hf_text_encoder(model) is not None:
                raise ValueError(
                    f"{name}: a model with a Hugging Face text tower needs its tokenizer "
                    "(open_clip.get_tokenizer(name), or open_clip.tokenizer.HFTokenizer(folder))"
                )
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=_text_source(model)[0].positional_embedding.shape[0])
        self = cls.__new__(cls)
        Backbone.__init__(self)
        self._setup(model, tokenizer, name, pretrained, truncate_text=truncate_text,
                    grad_checkpointing=grad_checkpointing, text_chunk_size=text_chunk_size, share_prefix=share_prefix,
                    compile_towers=compile_towers)
        return self

    def _setup(self, model: nn.Module, tokenizer: Any, model_name: str, pretrained: str | None, *,
               truncate_text: bool, grad_checkpointing: bool, text_chunk_size: int | None,
               share_prefix: bool, compile_towers: bool) -> None:
        self.model_name = model_name
        self.pretrained = pretrained
        self.model = model
        self.tokenizer = tokenizer
        self.truncate_text = truncate_text
        self.text_chunk_size = text_chunk_size
        self.share_prefix = share_prefix

        self._set_text_tower(open_clip_text_tower(model, tokenizer))
        self.embed_dim = self.text_tower.embed_dim
        try:
            self._vision: ViTTower | None = vit_tower(model.visual)
            self._vision_error = ""
        except NotImplementedError as err:  # e.g. ModifiedResNet: text-side methods still work
            self._vision, self._vision_error = None, str(err)
        self._resnet = resnet_tower(model.visual)  # CLIP's ResNet: multi-scale maps (CRIS)
        if self._vision is not None:
            self.vision_width, self.vision_layers = self._vision.width, self._vision.layers
        else:
            self.vision_width = getattr(model.visual, "width", None) or self._infer_vision_width()
        self._preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
        self.grad_checkpointing = grad_checkpointing
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.freeze()
        self.compile_towers = compile_towers
        self._compiled: dict[str, Any] = {}  # compiled shared-prefix functions, by name
        if compile_towers:
            # the whole image tower too: plain encode_image (also non-ViT towers, without blocks here)
            self._compile_towers(model.visual)

    # -- introspection -----------------------------------------------------------------------
    def _infer_vision_width(self) -> int:
        conv = getattr(self.model.visual, "conv1", None)
        if conv is not None:
            return conv.out_channels
        return self.embed_dim

    # -- images ------------------------------------------------------------------------------
    def encode_image(
        self,
        images: torch.Tensor,
        visual_prompts: Sequence[torch.Tensor] | None = None,
        placement: PromptPlacement = "after_cls",
    ) -> torch.Tensor:
        if visual_prompts is None:
            return self.model.encode_image(images)
        self.check_visual_prompts(len(visual_prompts))
        return self._vision.encode(images, visual_prompts, placement)

    def check_visual_prompts(self, depth: int = 1) -> None:
        if self._vision is None:
            raise NotImplementedError(self._vision_error)
        super().check_visual_prompts(depth)

    # -- scoring, identity -------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_bias", None)

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        return dict(self._preprocess_cfg)

    @property
    def identity(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "name": self.model_name,
            "pretrained": self.pretrained,
            "text_width": self.text_width,
            "vision_width": self.vision_width,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "text_layers": self.text_layers,
            "vision_layers": self.vision_layers,
            "fingerprint": self.fingerprint(
                [
                    *self.text_tower.identity_weights(),
                    self.model.logit_scale,
                    list(self.model.visual.parameters())[-1],
                ]
            ),
        }


def _splice_hidden_states(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, prompt: torch.Tensor, start: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook on a transformers layer: put ``prompt`` into its input hidden states."""
    if args:
        return (splice_prompt(args[0], prompt, start), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": splice_prompt(kwargs["hidden_states"], prompt, start)}


register_backbone("open_clip", OpenCLIPBackbone)  # every name without another family's prefix
