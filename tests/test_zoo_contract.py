"""The open_clip zoo contract, the way timm tests every registered model.

Every name in ``open_clip.list_models()`` is built on the meta device (offline stand-ins for hub
tokenizers and text towers) and must wrap, with visual prompts either supported or refused with
an error naming the supported towers. The smallest model of each family (text tower kind,
tokenizer layout, image tower kind) is then built with random weights — open_clip's own towers
shrunk to 2 layers — and checked numerically: CoOp initialised from a hand-written prompt gives
the model's own ``encode_text``, empty visual prompts its ``encode_image``, and VPT and MaPLe run
forward and backward.
"""

from __future__ import annotations

import open_clip
import pytest
import torch

from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.backbones.offline import offline_open_clip_model
from vlprompt.backbones.support import family_table
from vlprompt.prompts import PROMPT_LEARNERS

#: The smallest model of each family; the first test fails when open_clip grows a new family.
REPRESENTATIVES = [
    "MobileCLIP2-S0",  # timm FastViT, bidirectional text
    "MobileCLIP2-L-14",  # timm ViT, bidirectional text
    "ViT-L-14-CLIPA",  # BERT tokenizer with [SEP] stripped, last-token pooling
    "ViT-B-16-SigLIP2",  # Gemma tokenizer, timm ViT
    "ViT-B-16-SigLIP",  # T5 tokenizer, timm ViT
    "coca_ViT-B-32",  # CoCa text tower (class token appended)
    "coca_roberta-ViT-B-32",  # CoCa with a RoBERTa text tower
    "RN50",  # ModifiedResNet image tower
    "ViT-S-16-alt",  # OpenAI-style CLIP
    "convnext_tiny",  # timm ConvNeXt
    "PE-Core-T-16-384",  # timm Eva with rotary embeddings
    "swin_base_patch4_window7_224",  # timm Swin
    "ViTamin-S",  # timm ViT with a hybrid stem
    "vit_relpos_medium_patch16_cls_224",  # timm ViT with relative position bias
    "ViT-H-14-worldwide",  # MetaCLIP 2: XLM-V tokenizer, eos pooling
    "ViT-L-14-worldwide",  # MetaCLIP 2: mT5 tokenizer, eos pooling
    "nllb-clip-base",  # NLLB text tower
    "nllb-clip-base-siglip",  # NLLB text tower, timm SigLIP image tower
    "mt5-base-ViT-B-32",  # mT5 text tower
    "roberta-ViT-B-32",  # RoBERTa text tower
    "xlm-roberta-base-ViT-B-32",  # XLM-R text tower
]

#: Image towers that are ViTs and must take visual prompts.
VIT_TOWERS = {"open_clip VisionTransformer", "timm VisionTransformer", "timm Eva"}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return tmp_path_factory.mktemp("standins")


@pytest.mark.slow
def test_every_open_clip_model_wraps_or_refuses_clearly(standins):
    families = family_table(open_clip.list_models(), standins)
    rows = [row for group in families.values() for row in group]
    assert sorted(r.name for r in rows) == sorted(open_clip.list_models())
    for row in rows:
        assert row.text_prompts, row.name
        if row.image_tower in VIT_TOWERS:
            assert row.visual_prompts, (row.name, row.refusal)
        if not row.visual_prompts:
            assert "Supported:" in row.refusal and "ViT" in row.refusal, row.name
        if row.truncation:  # exact only on causal towers pooled at the end-of-text token
            assert row.text_tower.startswith("causal") and "CoCa" not in row.text_tower, row.name
    covered = {r.family for name in REPRESENTATIVES for r in rows if r.name == name}
    missing = [group[0].name for key, group in families.items() if key not in covered]
    assert not missing, f"families without a representative in REPRESENTATIVES: {missing}"


def _image(backbone: OpenCLIPBackbone) -> torch.Tensor:
    size = backbone.preprocess_cfg["size"]
    return torch.randn(1, 3, *(size if isinstance(size, (tuple, list)) else (size, size)))


@pytest.mark.slow
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_family_representative_reproduces_the_model_and_trains(name, standins):
    torch.manual_seed(0)
    model, tokenizer = offline_open_clip_model(name, standins, tiny=True)
    model.eval()
    backbone = OpenCLIPBackbone.from_model(model, tokenizer, name=name)
    classes = ["cat", "red circle"]

    coop = PROMPT_LEARNERS["coop"](backbone, classes, ctx_init="a photo of a")
    with torch.no_grad():
        ours = coop().text_features
        theirs = model.encode_text(tokenizer([f"a photo of a {c}." for c in classes]), normalize=False)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    image = _image(backbone)
    if backbone.vision_layers is None:
        with pytest.raises(NotImplementedError, match="Supported:"):
            PROMPT_LEARNERS["vpt"](backbone, classes)
        return
    with torch.no_grad():
        empty = backbone.encode_image(image, [torch.zeros(0, backbone.vision_width)])
        torch.testing.assert_close(empty, model.encode_image(image, normalize=False), atol=1e-5, rtol=1e-5)
    for method in ("vpt", "maple"):
        learner = PROMPT_LEARNERS[method](backbone, classes)
        out = learner(images=image)
        logits = out.image_features @ out.text_features.reshape(-1, out.text_features.shape[-1]).T
        logits.logsumexp(-1).sum().backward()
        grads = [p.grad for p in learner.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), method
        assert all(p.grad is None for p in backbone.parameters()), method


@pytest.mark.slow
def test_a_local_tokenizer_replaces_the_one_open_clip_fetches(standins):
    from vlprompt.backbones.offline import standin_tokenizer

    folder = standin_tokenizer("t5", standins / "local-t5")
    backbone = OpenCLIPBackbone("ViT-B-16-SigLIP", tokenizer=str(folder))
    assert backbone.context_length == 64 and backbone.text_start == 0 and not backbone.can_truncate_text
    ids = backbone.tokenize(["a photo of a cat."])
    assert ids.shape == (1, 64) and int(backbone.text_token_counts(ids)[0]) == 5  # canonicalised: no "."
    learner = PROMPT_LEARNERS["dept"](backbone, ["cat", "dog"])
    assert learner().text_features.shape == (2, backbone.embed_dim)
