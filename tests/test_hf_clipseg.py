"""CLIPSeg (and CLIP) through Hugging Face ``transformers``: a tiny random CLIPSeg saved to a local
folder (no download), its towers behind the backbone API, its own decoder as the head. Without
prompts vlprompt reproduces ``CLIPSegForImageSegmentation``'s logits; prompts of every kind reach the
towers; gradients reach only prompts (and the head when it is trained)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from test_prompt_contract import TINY_KWARGS
from vlprompt.data.classnames import with_full_stop
from vlprompt.backbones import HFCLIPBackbone
from vlprompt.methods.scoring import prompt_logits
from vlprompt.methods import PromptSegmenter
from vlprompt.methods.segmentation import save_decoder_weights
from vlprompt.prompts import PROMPT_LEARNERS, CoOpPromptLearner

transformers = pytest.importorskip("transformers")
pytest.importorskip("monai")

PROMPTS = ["a red star", "blue circle", "a red star"]
SIZE = 48  # the towers were built for 32 px: CLIPSeg interpolates its position embeddings


def write_clip_tokenizer(folder: Path) -> None:
    """OpenAI CLIP's BPE tokenizer files (vocab.json, merges.txt) from the vocabulary open_clip ships,
    so a Hugging Face tokenizer loads offline."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 32}))


def tiny_clipseg(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = transformers.CLIPSegConfig(
        text_config={"vocab_size": 49408, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
                     "num_attention_heads": 4, "max_position_embeddings": 32},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=24, extract_layers=[0, 1, 2], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32)
    model = transformers.CLIPSegForImageSegmentation(config)
    with torch.no_grad():  # random film/decoder biases so nothing is trivially zero
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    write_clip_tokenizer(folder)
    transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, resample=2, image_mean=[0.485, 0.456, 0.406],
                                   image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory) -> Path:
    return tiny_clipseg(tmp_path_factory.mktemp("clipseg"))


@pytest.fixture(scope="module")
def reference(clipseg_dir):
    """The model and tokenizer as transformers itself loads them."""
    model = transformers.CLIPSegForImageSegmentation.from_pretrained(clipseg_dir).eval()
    return model, transformers.AutoTokenizer.from_pretrained(clipseg_dir)


@pytest.fixture(scope="module")
def hf_backbone(clipseg_dir) -> HFCLIPBackbone:
    return HFCLIPBackbone(str(clipseg_dir), local_files_only=True)


def images(n=3, seed=0):
    x = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    x[2] = x[0]
    return x


def learner(name):
    return functools.partial(PROMPT_LEARNERS[name], **TINY_KWARGS.get(name, {}))


def test_backbone_reads_the_model_and_its_processor(hf_backbone):
    b = hf_backbone
    assert (b.text_width, b.vision_width, b.embed_dim, b.context_length, b.text_layers, b.vision_layers) == (48, 32, 24, 32, 3, 4)
    assert b.patch_size == (8, 8) and b.vision_prefix_tokens == 1 and b.text_start == 1 and b.is_causal
    assert b.preprocess_cfg == {"size": SIZE, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                "interpolation": "bilinear", "resize_mode": "squash"}
    assert b.vlsm_decoder()[1] == [0, 1, 2]
    assert b.identity["type"] == "HFCLIPBackbone" and b.identity["name"].startswith("hf:/")
    assert not any(p.requires_grad for p in b.parameters())


def test_text_and_image_features_equal_the_models_own(hf_backbone, reference):
    model, tokenizer = reference
    texts = ["a photo of a red star.", "blue", "a rather longer sentence about a green triangle"]
    ids = tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        own = model.clip.get_text_features(**ids)
        own_image = model.clip.get_image_features(pixel_values=images())
        ours = hf_backbone.encode_text(texts)
        vpt_free = hf_backbone._vision.encode(images(), [torch.zeros(0, 32)])  # the prompted loop, no prompt tokens
    own = own if isinstance(own, torch.Tensor) else own.pooler_output
    own_image = own_image if isinstance(own_image, torch.Tensor) else own_image.pooler_output
    assert torch.equal(hf_backbone.tokenize(texts), ids["input_ids"])
    assert torch.allclose(ours, own, atol=1e-5)
    assert torch.allclose(hf_backbone.encode_image(images()), own_image, atol=1e-6)
    assert torch.allclose(vpt_free, own_image, atol=1e-5)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_from_words_reproduces_the_hand_written_prompt(hf_backbone, position):
    coop = CoOpPromptLearner(hf_backbone, ["red star", "blue circle"], ctx_init="a photo of a",
                             class_token_position=position)
    if position == "end":
        texts = ["a photo of a red star.", "a photo of a blue circle."]
    elif position == "front":
        texts = ["red star a photo of a.", "blue circle a photo of a."]
    else:
        texts = ["a photo red star of a.", "a photo blue circle of a."]
    with torch.no_grad():
        assert torch.allclose(coop.text_features(), hf_backbone.encode_text(texts), atol=1e-5)


def test_without_prompts_the_segmenter_is_clipseg_exactly(hf_backbone, reference):
    model, tokenizer = reference
    seg = PromptSegmenter(hf_backbone).eval()
    assert type(seg.decoder).__name__ == "HFCLIPSegHead" and seg.decoder.extract_layers == [0, 1, 2]
    # TuneVLSeg feeds CLIPSeg its prompts with a full stop where one is missing (insert_stop_at_last).
    ids = tokenizer([with_full_stop(p) for p in PROMPTS], padding=True, return_tensors="pt")
    with torch.no_grad():
        own = model(pixel_values=images(), **ids).logits
        ours = seg(images(), PROMPTS)
    assert ours.shape == (3, 1, SIZE, SIZE)
    # vlprompt's block loop vs transformers' forward, summing in another order: float32 rounding of
    # logits of size ~17 is a few 1e-6.
    assert torch.allclose(ours[:, 0], own, atol=1e-4), (ours[:, 0] - own).abs().max()


def test_the_image_tower_stops_at_the_deepest_layer_read(hf_backbone):
    seen = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: seen.append(i))
             for i, layer in enumerate(hf_backbone.model.vision_model.encoder.layers)]
    try:
        with torch.no_grad():
            PromptSegmenter(hf_backbone)(images(), PROMPTS)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [0, 1, 2]  # the 4th block (index 3) is never run: CLIPSeg reads blocks 0..2 here


@pytest.mark.parametrize("name", ["coop", "cocoop", "vpt", "ivlp", "maple", "upt"])
def test_every_prompt_strategy_reaches_clipseg_and_only_prompts_learn(hf_backbone, name):
    torch.manual_seed(0)
    kwargs = dict(TINY_KWARGS.get(name, {}))
    if name == "maple":
        kwargs["depth"] = 3  # the text tower has 3 blocks
    seg = PromptSegmenter(hf_backbone, functools.partial(PROMPT_LEARNERS[name], **kwargs))
    before = seg(images(), PROMPTS)
    # Same image and prompt; rows of one batch may be summed in another order (kernel tails, thread
    # splits): float32 rounding of logits of size ~17 is ~1e-6.
    assert torch.allclose(before[0], before[2], atol=1e-4) and not torch.allclose(before[0], before[1])
    with torch.no_grad():
        for p in seg.prompt_learner.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = seg(images(), PROMPTS)
    assert not torch.allclose(before, after)
    after.sum().backward()
    learned = [p for p in seg.prompt_learner.parameters() if p.requires_grad]
    assert learned and all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)
    assert all(p.grad is None for p in seg.decoder.parameters())
    assert all(p.grad is None for p in hf_backbone.parameters())


def test_a_trained_head_learns_with_the_prompt_and_round_trips(hf_backbone, tmp_path):
    torch.manual_seed(0)
    seg = PromptSegmenter(hf_backbone, learner("vpt"), train_decoder=True)
    seg(images(), PROMPTS).sum().backward()
    assert all(p.grad is not None for p in seg.decoder.parameters())
    ids = {id(p) for p in seg.trainable_parameters()}
    assert ids == {id(p) for p in seg.decoder.parameters()} | {id(p) for p in seg.prompt_learner.parameters()}
    with torch.no_grad():
        for p in seg.decoder.parameters():
            p.add_(0.1)
    untouched = PromptSegmenter(hf_backbone)  # each segmenter trains its own copy of the model's head
    assert not torch.equal(untouched.decoder.decoder.film_mul.weight, seg.decoder.decoder.film_mul.weight)
    path = save_decoder_weights(seg.decoder, tmp_path / "decoder.safetensors")
    fresh = HFCLIPBackbone(hf_backbone.model_name, local_files_only=True)
    again = PromptSegmenter(fresh, decoder_weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(seg.decoder.state_dict().values(), again.decoder.state_dict().values()))
    # A head of the other kind is refused, whichever way round.
    with pytest.raises(ValueError, match="clipseg-style head, not a clipseg-transformers"):
        PromptSegmenter(fresh, decoder_weights="zoo:shapeworld-clip-tiny")
    with pytest.raises(ValueError, match="clipseg-transformers head, not a clipseg-style"):
        PromptSegmenter(fresh, head="decoder", decoder_weights=str(path))


def test_head_choice_errors(hf_backbone, backbone):
    with pytest.raises(ValueError, match="brings no segmentation decoder"):
        PromptSegmenter(backbone, head="model")
    with pytest.raises(ValueError, match="the model's decoder reads layers"):
        PromptSegmenter(hf_backbone, extract_layers=[0, 3])
    with pytest.raises(ValueError, match="head must be"):
        PromptSegmenter(hf_backbone, head="clipseg")
    # vlprompt's own decoder works over CLIPSeg's towers too.
    seg = PromptSegmenter(hf_backbone, head="decoder", reduce_dim=8, n_heads=2, train_decoder=True)
    assert seg(images(), PROMPTS).shape == (3, 1, SIZE, SIZE)


def test_fit_on_segmentation_data_keeps_the_frozen_head_out_of_the_checkpoint(hf_backbone, tmp_path):
    from vlprompt.data import ShapeWorldSegmentationDataModule

    pl.seed_everything(0)
    dm = ShapeWorldSegmentationDataModule(str(tmp_path / "seg"), domain="clean", batch_size=16, eval_batch_size=64,
                                          num_workers=0, augment=False)
    seg = PromptSegmenter(hf_backbone, learner("coop"), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                          lr_scheduler="constant")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         max_epochs=1, limit_train_batches=3, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(seg, datamodule=dm)
    assert dm.dataset("train")[0]["image"].shape[-1] == SIZE  # the processor's size reached the data
    state = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)["state_dict"]
    assert set(state) == {"prompt_learner.ctx"}
    restored = PromptSegmenter.load_from_checkpoint(next(tmp_path.rglob("*.ckpt")), backbone=hf_backbone,
                                                    prompt_learner=learner("coop"))
    assert torch.equal(restored.prompt_learner.ctx, seg.prompt_learner.ctx)


def tiny_clip(seed: int = 0):
    """A tiny random transformers ``CLIPModel`` with CLIP's vocabulary (32 px images)."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 24},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    return transformers.CLIPModel(config).eval()


def test_plain_clip_through_transformers():
    model = tiny_clip()
    b = HFCLIPBackbone.from_model(model)  # open_clip's CLIP tokenizer: the same vocabulary
    assert b.vlsm_decoder() is None and b.preprocess_cfg["resize_mode"] == "shortest"
    ids = b.tokenize(["a red star", "blue"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        own_text = model.get_text_features(input_ids=ids)
        own_image = model.get_image_features(pixel_values=x)
        own_text = own_text if isinstance(own_text, torch.Tensor) else own_text.pooler_output
        own_image = own_image if isinstance(own_image, torch.Tensor) else own_image.pooler_output
        assert torch.allclose(b.encode_text(["a red star", "blue"]), own_text, atol=1e-5)
        assert torch.allclose(b.encode_image(x), own_image, atol=1e-6)
    vpt = PROMPT_LEARNERS["vpt"](b, ["red star", "blue circle"], n_tokens=2, depth=2)
    prompt_logits(vpt(images=x), b).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vpt.parameters())
    with pytest.raises(ValueError, match="pass its tokenizer"):
        bad = transformers.CLIPModel(transformers.CLIPConfig(
            text_config={"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8}))
        HFCLIPBackbone.from_model(bad)


def test_unknown_or_missing_models_get_clear_errors(tmp_path):
    with pytest.raises(OSError, match="Without internet, download it elsewhere"):
        HFCLIPBackbone(str(tmp_path / "nothing-here"), local_files_only=True)
    folder = tmp_path / "bert"
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(folder)
    with pytest.raises(NotImplementedError, match="supports clip, clipseg"):
        HFCLIPBackbone(str(folder))


def test_cli_fits_clipseg_from_the_shipped_config_and_segments_a_folder(clipseg_dir, reference, tmp_path):
    """``configs/seg/clipseg_coop.yaml`` with the tiny CLIPSeg and a TuneVLSeg-layout folder, then
    ``vlprompt segment --backbone hf:FOLDER`` with the saved prompt: masks as CLIPSeg's own output."""
    import csv

    import numpy as np
    from PIL import Image

    from test_seg_data import make_tunevlseg
    from vlprompt.cli import main
    from vlprompt.data.images import build_eval_transform
    from vlprompt.resources import bundled_dir

    data = make_tunevlseg(tmp_path / "data")
    config = bundled_dir("configs") / "seg" / "clipseg_coop.yaml"
    main(["fit", "--config", str(config), "--model.init_args.backbone.init_args.model_name", f"hf:{clipseg_dir}",
          "--data.init_args.root", str(data), "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
          "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run"),
          "--save_prompt", str(tmp_path / "prompt")])
    assert (tmp_path / "prompt" / "config.json").is_file() and not (tmp_path / "prompt" / "decoder.safetensors").exists()

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(photos / "a.png")
    out = tmp_path / "segment"
    main(["segment", "--images", str(photos), "--text", "a red star", "--backbone", f"hf:{clipseg_dir}",
          "--out", str(out), "--device", "cpu"])
    row = next(csv.DictReader(open(out / "segments.csv")))
    mask = np.asarray(Image.open(row["mask"])) > 0
    assert mask.shape == (30, 40)
    # Zero-shot through vlprompt equals CLIPSeg's own logits, brought to the image's size.
    model, tokenizer = reference
    hf = HFCLIPBackbone(f"hf:{clipseg_dir}", local_files_only=True)
    pixels = build_eval_transform({**hf.preprocess_cfg, "resize_mode": "squash"})(Image.open(photos / "a.png"))[None]
    with torch.no_grad():
        own = model(pixel_values=pixels, **tokenizer(["a red star."], return_tensors="pt")).logits.reshape(1, 1, SIZE, SIZE)
    own = torch.nn.functional.interpolate(own, size=(30, 40), mode="bilinear")[0, 0].sigmoid().numpy() > 0.5
    assert (mask == own).mean() > 0.999
    # The tuned prompt segments too (and a prompt from another backbone would be refused).
    main(["segment", "--images", str(photos), "--text", "a red star", "--backbone", f"hf:{clipseg_dir}",
          "--prompt", str(tmp_path / "prompt"), "--out", str(tmp_path / "tuned"), "--device", "cpu"])
    assert next(csv.DictReader(open(tmp_path / "tuned" / "segments.csv")))["status"] == "ok"
