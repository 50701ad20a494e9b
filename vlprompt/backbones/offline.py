"""Offline stand-ins for the Hugging Face pieces some open_clip models fetch from the hub.

open_clip takes the tokenizers of SigLIP, SigLIP2, CLIPA and MetaCLIP 2, and the text towers of
its RoBERTa / XLM-R / MT5 / NLLB models, from the Hugging Face hub. Real users point
``OpenCLIPBackbone(..., tokenizer=FOLDER)`` (or a ``local-dir:`` model) at their local copies.
Without the hub, this module builds small stand-ins with the same *special-token layout* (start
token or none, end token, padding id, lower-casing, separator stripping) and tiny transformers
configs of the same architecture, so that every open_clip family can be wrapped, prompted and
checked offline (:func:`offline_open_clip_model`, used by the zoo contract test and by
``tools/zoo_support.py``). The stand-ins' vocabularies are small BPE tables trained on a few
words: they exercise the code paths, not the real models' text.
"""

from __future__ import annotations

import copy
import string
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["TOKENIZER_LAYOUTS", "offline_open_clip_model", "standin_hf_text_model", "standin_tokenizer", "tokenizer_layout"]

#: Special-token layouts: special tokens in id order, the single-text template, padding,
#: lower-casing. Named after the tokenizer families open_clip uses.
TOKENIZER_LAYOUTS: dict[str, dict[str, Any]] = {
    # SentencePiece T5/mT5 (SigLIP c4-en and i18n mc4, MT5 towers, MetaCLIP 2 mt5): no start token.
    "t5": {"specials": ["<pad>", "</s>", "<unk>"], "template": "$A </s>", "pad": "<pad>", "eos": "</s>",
           "unk": "<unk>"},
    # Gemma SentencePiece (SigLIP2): start and end tokens.
    "gemma": {"specials": ["<pad>", "<eos>", "<bos>", "<unk>"], "template": "<bos> $A <eos>", "pad": "<pad>",
              "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"},
    # BERT WordPiece, lower-cased (CLIPA: open_clip strips the [SEP] token).
    "bert": {"specials": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "template": "[CLS] $A [SEP]",
             "pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "lowercase": True},
    # RoBERTa / XLM-R / XLM-V BPE: <s> text </s>, padding id 1.
    "roberta": {"specials": ["<s>", "<pad>", "</s>", "<unk>"], "template": "<s> $A </s>", "pad": "<pad>",
                "bos": "<s>", "eos": "</s>", "unk": "<unk>"},
    # NLLB: source-language token first, </s> last, padding id 1.
    "nllb": {"specials": ["<s>", "<pad>", "</s>", "<unk>", "eng_Latn"], "template": "eng_Latn $A </s>",
             "pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"},
}

#: transformers model type of each hub text tower open_clip names.
_HF_MODEL_TYPES = {"roberta": "roberta", "xlm-roberta": "xlm-roberta", "mt5": "mt5", "nllb": "m2m_100"}

_CORPUS = (
    "a photo of a cat dog car bird ship truck horse frog deer plane red green blue circle square "
    "triangle small large picture image drawing painting of the and X"
).split()


def tokenizer_layout(hub_name: str) -> str:
    """The special-token layout of the hub tokenizer ``hub_name`` (as named in open_clip configs)."""
    name = hub_name.lower()
    if "siglip2" in name:
        return "gemma"
    if "siglip" in name or "mt5" in name:
        return "t5"
    if "bert-base" in name and "roberta" not in name:
        return "bert"
    if "nllb" in name:
        return "nllb"
    if "roberta" in name or "xlm-v" in name:
        return "roberta"
    raise ValueError(f"no offline stand-in layout for tokenizer {hub_name!r}")


def standin_tokenizer(layout: str, folder: str | Path, vocab_size: int = 320) -> Path:
    """Write a small Hugging Face tokenizer with ``layout``'s special tokens to ``folder``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TOKENIZER_LAYOUTS[layout]
    folder = Path(folder)
    tok = Tokenizer(models.BPE(unk_token=spec["unk"]))
    if spec.get("lowercase"):
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list(string.ascii_letters + string.digits + string.punctuation)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator([" ".join(_CORPUS)] * 4, trainer)
    ids = {t: tok.token_to_id(t) for t in spec["specials"]}
    specials_in_template = [t for t in spec["template"].split() if t in ids]
    tok.post_processor = processors.TemplateProcessing(
        single=spec["template"], special_tokens=[(t, ids[t]) for t in specials_in_template]
    )
    roles = {f"{role}_token": spec[role] for role in ("pad", "eos", "bos", "unk", "cls", "sep") if role in spec}
    PreTrainedTokenizerFast(tokenizer_object=tok, **roles).save_pretrained(folder)
    return folder


def standin_hf_text_model(model_type: str, folder: str | Path, tokenizer_layout_name: str) -> Path:
    """Write a tokenizer and a tiny transformers config of ``model_type`` (``roberta``,
    ``xlm-roberta``, ``mt5``, ``m2m_100``) to ``folder``: a local stand-in for a hub text tower."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    standin_tokenizer(tokenizer_layout_name, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if tok.bos_token_id is not None:
        ids["bos_token_id"] = tok.bos_token_id
    sizes: dict[str, dict[str, Any]] = {
        "roberta": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
                    "max_position_embeddings": 130},
        "mt5": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 3, "num_decoder_layers": 1, "num_heads": 2,
                "decoder_start_token_id": tok.pad_token_id},
        "m2m_100": {"d_model": 32, "encoder_layers": 3, "decoder_layers": 1, "encoder_attention_heads": 2,
                    "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                    "max_position_embeddings": 128, "scale_embedding": True, "decoder_start_token_id": 2},
    }
    sizes["xlm-roberta"] = sizes["roberta"]
    AutoConfig.for_model(model_type, **sizes[model_type], **ids).save_pretrained(folder)
    return folder


def _shrunk(cfg: dict[str, Any], text_cfg: dict[str, Any]) -> dict[str, Any]:
    """Overrides that make open_clip's own towers of ``cfg`` tiny (2 layers, width 64) while
    keeping their kind: pooling, masks, class tokens, norms. timm image towers keep their size."""
    text_cfg.update(width=64, heads=4, layers=2)
    if text_cfg.get("hf_tokenizer_name") and "hf_model_name" not in text_cfg:
        text_cfg["vocab_size"] = 1024  # the stand-in tokenizers' ids are far below this
    vision_cfg = copy.deepcopy(cfg.get("vision_cfg", {}))
    if "timm_model_name" not in vision_cfg:
        if isinstance(vision_cfg.get("layers"), (list, tuple)):  # ModifiedResNet
            vision_cfg.update(layers=[1, 1, 1, 1], width=16, head_width=16, image_size=64)
        else:
            vision_cfg.update(layers=2, width=64, head_width=32, image_size=4 * vision_cfg.get("patch_size", 16))
    overrides: dict[str, Any] = {"vision_cfg": vision_cfg}
    if "timm_model_name" not in vision_cfg:  # timm towers may use their width as the joint width
        overrides["embed_dim"] = 32
    if "multimodal_cfg" in cfg:  # CoCa's decoder
        overrides["multimodal_cfg"] = {**cfg["multimodal_cfg"], "width": 64, "heads": 4, "layers": 1}
    return overrides


def offline_open_clip_model(
    name: str, folder: str | Path, *, device: torch.device | str | None = None, tiny: bool = False,
    **model_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """open_clip model ``name`` with random weights and its tokenizer, built without the hub: hub
    tokenizers and hub text towers are replaced by stand-ins written under ``folder``.
    ``device="meta"`` builds the model without allocating its weights (shapes only); ``tiny``
    shrinks open_clip's own towers to 2 layers of width 64 (same kinds of tower) for fast checks."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}")
    text_cfg = copy.deepcopy(cfg.get("text_cfg", {}))
    if tiny:
        model_kwargs = {**_shrunk(cfg, text_cfg), **model_kwargs}
    folder = Path(folder)
    hub_tower = text_cfg.get("hf_model_name")
    hub_tokenizer = text_cfg.get("hf_tokenizer_name")
    layout = tokenizer_layout(hub_tokenizer) if hub_tokenizer else None
    if hub_tower:
        kind = next(k for k in ("xlm-roberta", "roberta", "mt5", "nllb") if k in hub_tower.lower())
        local = folder / f"hf-{_HF_MODEL_TYPES[kind]}-{layout}"
        if not (local / "config.json").is_file():
            standin_hf_text_model(_HF_MODEL_TYPES[kind], local, layout)
        text_cfg.update(hf_model_name=str(local), hf_tokenizer_name=str(local), hf_model_pretrained=False)
        tokenizer_folder = local
    elif hub_tokenizer:
        tokenizer_folder = folder / f"tokenizer-{layout}"
        if not (tokenizer_folder / "tokenizer.json").is_file():
            standin_tokenizer(layout, tokenizer_folder)
    else:
        tokenizer_folder = None
    with torch.device(device) if device is not None else nullcontext():
        model = open_clip.create_model(name, device=device, pretrained_image=False, pretrained_hf=False,
                                       text_cfg=text_cfg, **model_kwargs)
    context_length = text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
    if tokenizer_folder is None:
        tokenizer = open_clip.get_tokenizer(name)
    else:
        tokenizer = open_clip.tokenizer.HFTokenizer(
            str(tokenizer_folder), context_length=context_length, **text_cfg.get("tokenizer_kwargs", {})
        )
    return model, tokenizer

