"""open_clip encoders (``CLIP`` and ``CustomTextCLIP`` layouts) behind the :class:`Backbone` API."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import open_clip
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlprompt.backbones.base import Backbone, check_deep_prompt_depth, run_deep_text_prompts, splice_prompt
from vlprompt.backbones.prefix import blocks_support_prefix_cache, encode_prefix, encode_suffix
from vlprompt.backbones.vision import PromptPlacement, ViTTower, run_block_maybe_checkpointed, vit_tower

__all__ = ["OpenCLIPBackbone"]

log = logging.getLogger(__name__)

_TRUNCATABLE_POOLS = ("argmax", "eos")


@dataclass
class _TextTower:
    """The pieces of an open_clip text transformer, whichever model layout holds them."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None
    pad_id: int
    use_pad_mask: bool
    cls_emb: torch.Tensor | None
    correct_cls_mask: bool
    heads: int


def _text_tower(model: nn.Module) -> _TextTower:
    text = getattr(model, "text", None)
    if hasattr(model, "token_embedding"):  # CLIP layout: the text tower is flattened onto the model
        source, pool_type, eos_id = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif text is not None and hasattr(text, "token_embedding"):  # CustomTextCLIP + TextTransformer
        source, pool_type, eos_id = text, text.pool_type, getattr(text, "eos_id", None)
    else:
        raise NotImplementedError(
            f"{type(model).__name__} has a text tower of type {type(text).__name__}, which vlprompt cannot "
            "prompt yet. Supported: open_clip CLIP and CustomTextCLIP models with an open_clip "
            "TextTransformer (OpenAI CLIP, LAION, DataComp, MetaCLIP, SigLIP, EVA ...)."
        )
    return _TextTower(
        token_embedding=source.token_embedding,
        positional_embedding=source.positional_embedding,
        transformer=source.transformer,
        ln_final=source.ln_final,
        text_projection=source.text_projection,
        attn_mask=source.attn_mask,
        pool_type=pool_type,
        eos_id=eos_id,
        pad_id=getattr(source, "pad_id", 0),
        use_pad_mask=getattr(source, "use_pad_mask", False),
        cls_emb=getattr(source, "cls_emb", None),
        correct_cls_mask=getattr(source, "correct_cls_mask", False),
        heads=source.transformer.resblocks[0].attn.num_heads,
    )


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


def _hf_text_encoder(model: nn.Module) -> nn.Module | None:
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
        from vlprompt.zoo import resolve_model_name

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
            model = open_clip.create_model(
                resolved, pretrained=pretrained, precision=precision, pretrained_image=False, pretrained_hf=False
            )
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
            if _hf_text_encoder(model) is not None:
                raise ValueError(
                    f"{name}: a model with a Hugging Face text tower needs its tokenizer "
                    "(open_clip.get_tokenizer(name), or open_clip.tokenizer.HFTokenizer(folder))"
                )
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=_text_tower(model).positional_embedding.shape[0])
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

        hf = _hf_text_encoder(model)
        if hf is None:
            tower = self._tower = _text_tower(model)
            self.text_width = tower.token_embedding.embedding_dim
            self.context_length = tower.positional_embedding.shape[0]
            self.text_layers = len(tower.transformer.resblocks)
            self.pool_type = "last" if tower.cls_emb is not None else tower.pool_type
            self.is_causal = tower.attn_mask is not None
            self.embed_dim = self._infer_embed_dim()
            self._prefix_cache_blocks = blocks_support_prefix_cache(tower.transformer.resblocks)
        else:  # a transformers encoder (RoBERTa, XLM-R, MT5, NLLB): bidirectional, masked padding
            self._tower = None
            self.text_width = hf.transformer.get_input_embeddings().embedding_dim
            self.context_length = tokenizer.context_length
            self.text_layers = len(_hf_layers(hf.transformer))
            self.pool_type = _HF_POOLS.get(type(hf.pooler).__name__, type(hf.pooler).__name__)
            self.is_causal = False
            self.embed_dim = hf.output_dim
            self._prefix_cache_blocks = False
        try:
            self._vision: ViTTower | None = vit_tower(model.visual)
            self._vision_error = ""
        except NotImplementedError as err:  # e.g. ModifiedResNet: text-side methods still work
            self._vision, self._vision_error = None, str(err)
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
            self._compile()

    def _compile(self) -> None:
        """``torch.compile`` the towers' blocks in place (parameter names unchanged) and the
        shared-prefix functions."""
        text_blocks = _hf_layers(self._hf.transformer) if self._tower is None else self._tower.transformer.resblocks
        image_blocks = self._vision.blocks if self._vision is not None else []
        # Blocks for the prompted paths (which run them one by one); the whole image tower for
        # plain encode_image (also non-ViT towers, which have no blocks here).
        for block in [*text_blocks, *image_blocks]:
            block.compile(dynamic=True)
        self.model.visual.compile(dynamic=True)
        self._compiled = {"prefix": torch.compile(encode_prefix, dynamic=True),
                          "suffix": torch.compile(encode_suffix, dynamic=True)}

    def _apply(self, fn, *args: Any, **kwargs: Any) -> OpenCLIPBackbone:
        super()._apply(fn, *args, **kwargs)
        # .to()/.double() replace buffers (the causal mask) with new tensors: look them up again.
        if self._tower is not None:
            self._tower = _text_tower(self.model)
        return self

    @property
    def _hf(self) -> nn.Module | None:
        return _hf_text_encoder(self.model)

    # -- introspection -----------------------------------------------------------------------
    def _infer_embed_dim(self) -> int:
        proj = self._tower.text_projection
        if isinstance(proj, nn.Linear):
            return proj.out_features
        if isinstance(proj, torch.Tensor):
            return proj.shape[1]
        return self.text_width

    def _infer_vision_width(self) -> int:
        conv = getattr(self.model.visual, "conv1", None)
        if conv is not None:
            return conv.out_channels
        return self.embed_dim

    @property
    def can_truncate_text(self) -> bool:
        """Whether pooled text features are exactly unchanged by dropping tokens after EOT."""
        return self.is_causal and self.pool_type in _TRUNCATABLE_POOLS and self._tower.cls_emb is None

    # -- text --------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        embed = self._hf.transformer.get_input_embeddings() if self._tower is None else self._tower.token_embedding
        return embed(token_ids.to(self.device))

    def text_length_needed(self, token_ids: torch.Tensor) -> int:
        """How many leading positions of ``token_ids`` the pooled features depend on."""
        if self.truncate_text and self.can_truncate_text:
            return int(self.pool_indices(token_ids).max()) + 1
        return token_ids.shape[1]

    def pool_indices(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Position of the token whose feature is pooled, for each sequence."""
        n, length = token_ids.shape
        if self.pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (token_ids == self._tower.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(n, dtype=torch.long, device=token_ids.device)
        if self.pool_type == "last":
            return torch.full((n,), length - 1, dtype=torch.long, device=token_ids.device)
        raise NotImplementedError(f"text pool type {self.pool_type!r} gives no single pooled feature")

    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None = None,
        prompt_start: int = 1,
        shared_prefix: int = 0,
        prefix_groups: int = 1,
    ) -> torch.Tensor:
        token_ids = token_ids.to(embeddings.device)
        if self._can_share_prefix(embeddings, token_ids, deep_prompts, prompt_start, shared_prefix, prefix_groups):
            return self._encode_shared_prefix(
                embeddings, token_ids, list(deep_prompts or []), prompt_start, shared_prefix, prefix_groups
            )
        n, size = embeddings.shape[0], self.text_chunk_size
        if size is None or n <= size:
            return self._encode_text_chunk(embeddings, token_ids, deep_prompts, prompt_start)
        deep_prompts = list(deep_prompts or [])
        # Checkpoint whole chunks: autograd keeps only each chunk's inputs, and the backward pass
        # recomputes one chunk at a time (its blocks then run plainly, not checkpointed again).
        recompute = (
            self.grad_checkpointing
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in [embeddings, *deep_prompts])
        )
        features = []
        for start in range(0, n, size):
            rows = slice(start, start + size)
            chunk_prompts = [p[rows] if p.dim() == 3 else p for p in deep_prompts]  # [N, n, D] per prompt
            args = (embeddings[rows], token_ids[rows], chunk_prompts, prompt_start)
            if recompute:
                features.append(checkpoint(self._encode_text_chunk, *args, checkpoint_blocks=False, use_reentrant=False))
            else:
                features.append(self._encode_text_chunk(*args))
        return torch.cat(features)

    def _can_share_prefix(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
        shared_prefix: int,
        prefix_groups: int,
    ) -> bool:
        """Whether the shared-prefix path applies: a causal tower of plain blocks, deep prompts
        shared and inside the prefix, every pooled token after it."""
        if prefix_groups < 1 or embeddings.shape[0] % prefix_groups:
            raise ValueError(f"{embeddings.shape[0]} prompts cannot form {prefix_groups} groups of equal size")
        if not (self.share_prefix and shared_prefix >= 2 and self.can_truncate_text):
            return False
        if any(p.dim() != 2 or prompt_start + p.shape[0] > shared_prefix for p in deep_prompts or []):
            return False
        return self._prefix_cache_blocks and int(self.pool_indices(token_ids).min()) >= shared_prefix

    def _encode_shared_prefix(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: list[torch.Tensor],
        prompt_start: int,
        shared_prefix: int,
        prefix_groups: int,
    ) -> torch.Tensor:
        """Encode each group's prefix once and every suffix against its cached keys/values
        (:mod:`vlprompt.backbones.prefix`); suffixes run in buckets of equal length (at most
        ``text_chunk_size`` each), so no padding is computed."""
        tower = self._tower
        blocks = tower.transformer.resblocks
        check_deep_prompt_depth(len(deep_prompts), len(blocks))
        cast_dtype = tower.transformer.get_cast_dtype()
        position = tower.positional_embedding.to(cast_dtype)
        n, p = embeddings.shape[0], shared_prefix
        group_size = n // prefix_groups
        prefix = embeddings[::group_size, :p].to(cast_dtype) + position[:p]
        cache = self._compiled.get("prefix", encode_prefix)(blocks, prefix, tower.attn_mask, deep_prompts,
                                                            prompt_start)
        groups = torch.arange(n, device=embeddings.device) // group_size if prefix_groups > 1 else None
        pooled_at = self.pool_indices(token_ids)

        def run(rows: torch.Tensor) -> torch.Tensor:
            end = int(pooled_at[rows].max()) + 1
            x = embeddings[rows, p:end].to(cast_dtype) + position[p:end]
            suffix = self._compiled.get("suffix", encode_suffix)
            x = suffix(blocks, x, cache, tower.attn_mask, None if groups is None else groups[rows])
            return self._project_text(tower.ln_final(x[torch.arange(len(rows)), pooled_at[rows] - p]))

        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        order = torch.argsort(pooled_at, stable=True)
        buckets = torch.split(order, torch.unique_consecutive(pooled_at[order], return_counts=True)[1].tolist())
        size = self.text_chunk_size or n
        chunks = [chunk for bucket in buckets for chunk in torch.split(bucket, size)]
        features = [checkpoint(run, rows, use_reentrant=False) if recompute else run(rows) for rows in chunks]
        return torch.cat(features)[torch.argsort(torch.cat(chunks))]

    def _project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = self._tower.text_projection
        if isinstance(proj, nn.Module):
            return proj(pooled)
        return pooled @ proj if proj is not None else pooled

    def _encode_text_chunk(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
        checkpoint_blocks: bool = True,
    ) -> torch.Tensor:
        if self._tower is None:
            return self._encode_hf_text(embeddings, token_ids, deep_prompts, prompt_start)
        tower = self._tower
        pooled_at = self.pool_indices(token_ids)
        # Causal attention: the feature at position p only sees tokens <= p, so everything after
        # the last pooled position is dead weight. Dropping it is exact (text_length_needed).
        length = min(self.text_length_needed(token_ids), embeddings.shape[1])
        embeddings, token_ids = embeddings[:, :length], token_ids[:, :length]

        cast_dtype = tower.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype)
        if tower.cls_emb is not None:  # CoCa-style: a class token appended after the text
            x = torch.cat([x, tower.cls_emb.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
            length += 1
        attn_mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        if tower.use_pad_mask or tower.cls_emb is not None:
            pad_mask = self._padding_mask(token_ids, length, x.dtype)
            attn_mask = pad_mask if attn_mask is None else attn_mask.unsqueeze(0) + pad_mask
        x = x + tower.positional_embedding[:length].to(cast_dtype)
        x = self._run_text_blocks(x, attn_mask, deep_prompts, prompt_start, checkpoint_blocks)

        if tower.cls_emb is not None:
            pooled = tower.ln_final(x[:, -1])
        else:
            x = tower.ln_final(x)
            pooled = x[torch.arange(x.shape[0], device=x.device), pooled_at]
        return self._project_text(pooled)

    def _encode_hf_text(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
    ) -> torch.Tensor:
        """open_clip's ``HFTextEncoder.forward`` from embeddings: the encoder runs on the token
        ids, so its position ids (RoBERTa's padding-aware ones, NLLB's sinusoids) and attention
        mask are exactly those of the plain text, and a hook hands it ``embeddings`` in place of
        its own lookup of the ids; deep prompts replace tokens at the entry of layers ``1..n``."""
        encoder = self._hf
        transformer = encoder.transformer
        mask = (token_ids != encoder.config.pad_token_id).long()
        layers = _hf_layers(transformer)
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

    def _padding_mask(self, token_ids: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        valid = token_ids != self._tower.pad_id
        if self._tower.cls_emb is not None:
            # The class token's key column: at the end, or (open_clip's legacy order, which the
            # released CoCa weights were trained with) in front, shifting the padding columns by one.
            ones = valid.new_ones(valid.shape[0], 1)
            valid = torch.cat([valid, ones] if self._tower.correct_cls_mask else [ones, valid], dim=1)
        additive = torch.zeros(valid.shape[0], length, length, dtype=dtype, device=token_ids.device)
        additive.masked_fill_(~valid[:, None, :], float("-inf"))
        return additive.repeat_interleave(self._tower.heads, 0)

    def _run_text_blocks(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        deep_prompts: Sequence[torch.Tensor] | None,
        prompt_start: int,
        checkpoint_blocks: bool = True,
    ) -> torch.Tensor:
        transformer = self._tower.transformer
        batch_first = getattr(transformer, "batch_first", True)

        def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if not batch_first:
                x = x.transpose(0, 1)
            if checkpoint_blocks:
                x = run_block_maybe_checkpointed(transformer, block, x, attn_mask=attn_mask)
            else:
                x = block(x, attn_mask=attn_mask)
            return x if batch_first else x.transpose(0, 1)

        return run_deep_text_prompts(transformer.resblocks, x, run, deep_prompts, prompt_start)

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
        tower = self._tower
        text_weights = (
            [tower.positional_embedding, tower.ln_final.weight] if tower is not None
            else [list(self._hf.transformer.parameters())[-1]]
        )
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
                    *text_weights,
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
