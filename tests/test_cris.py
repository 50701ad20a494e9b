"""CRIS (Wang et al., CVPR 2022) as TuneVLSeg runs it, on a tiny random ResNet CLIP: the whole forward
pass against an independent re-statement of the reference computation (TuneVLSeg's vendored
``cris_model``: CLIP's ResNet with CRIS's dense attention pool, word features and sentence state,
the FPN neck, the vision-language decoder, the projector's dynamic kernel, bicubic upsampling), in
float64; CoCoOp given C5 averaged over positions; gradients reaching only the prompt; save/load;
a CRIS head and a CLIPSeg-style head refusing each other; visual prompts refused."""

from __future__ import annotations

import functools
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.methods import PromptSegmenter
from vlprompt.methods.segmentation import load_decoder_weights, save_decoder_weights
from vlprompt.prompts import CoCoOpPromptLearner, CoOpPromptLearner
from vlprompt.seg import CLIPSegDecoder
from vlprompt.seg.cris import CRISHead
from vlprompt.seg.heads import build_head

pytest.importorskip("monai")

#: A ResNet CLIP (RN50's layout, one block per stage, width 8) whose text width (the decoder's)
#: differs from the joint width, so nothing can confuse them.
TINY_RN_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
HEAD = {"num_layers": 2, "num_heads": 2, "dim_ffn": 48, "dropout": 0.2}
PROMPTS = ["red circle", "blue square", "red circle"]


@pytest.fixture(scope="module")
def rn_backbone() -> OpenCLIPBackbone:
    torch.manual_seed(0)
    return OpenCLIPBackbone.from_model(open_clip.CLIP(**TINY_RN_CLIP), name="tiny-rn")


def randomise_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Batch norms with random statistics and affine weights, so that none is the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def segmenter(backbone, learner=CoOpPromptLearner, **kwargs) -> PromptSegmenter:
    torch.manual_seed(0)
    model = PromptSegmenter(backbone, functools.partial(learner, n_ctx=4, ctx_init="a photo of a"), head="cris",
                            head_options=HEAD, **kwargs)
    randomise_norms(model.decoder)
    return model


def images(n: int = 3) -> torch.Tensor:
    x = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x[2] = x[0]
    return x


# -- the reference, restated from TuneVLSeg's cris_model (sequence-first, as it is written) ------------
def ref_pos1d(d: int, length: int, like: torch.Tensor) -> torch.Tensor:
    pe = torch.zeros(length, d, dtype=like.dtype)
    position = torch.arange(length, dtype=like.dtype).unsqueeze(1)
    angles = position * 1e-4 ** (torch.arange(0, d, 2, dtype=like.dtype) / d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angles), torch.cos(angles)
    return pe.unsqueeze(1)


def ref_pos2d(d: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    pe = torch.zeros(d, h, w, dtype=like.dtype)
    half = d // 2
    mul = 1e-4 ** (torch.arange(0, half, 2, dtype=like.dtype) / half)
    aw = torch.arange(w, dtype=like.dtype).unsqueeze(1) * mul
    ah = torch.arange(h, dtype=like.dtype).unsqueeze(1) * mul
    pe[0:half:2] = torch.sin(aw).T.unsqueeze(1).repeat(1, h, 1)
    pe[1:half:2] = torch.cos(aw).T.unsqueeze(1).repeat(1, h, 1)
    pe[half::2] = torch.sin(ah).T.unsqueeze(2).repeat(1, 1, w)
    pe[half + 1::2] = torch.cos(ah).T.unsqueeze(2).repeat(1, 1, w)
    return pe.reshape(-1, 1, h * w).permute(2, 1, 0)


def ref_image(clip: torch.nn.Module, connect: torch.nn.Module, x: torch.Tensor):
    """CRIS's ModifiedResNet: (layer2, layer3, attnpool over every position + connect residual)."""
    v = clip.visual
    x = v.layer1(v.stem(x))
    x2 = v.layer2(x)
    x3 = v.layer3(x2)
    x4 = v.layer4(x3)
    pool = v.attnpool
    b, c, h, w = x4.shape
    side = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
    pos = pool.positional_embedding.unsqueeze(0)[:, -side * side:].reshape(1, side, side, c).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(h, w), align_corners=False, mode="bicubic").flatten(2)
    seq = (x4.view(b, c, -1) + pos).permute(2, 0, 1)
    seq, _ = F.multi_head_attention_forward(
        seq, seq, seq, c, pool.num_heads, None, torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        None, None, False, 0.0, pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight)
    return x2, x3, torch.relu(seq.permute(1, 2, 0).reshape(b, -1, h, w) + connect(x4))


def ref_text(clip: torch.nn.Module, ids: torch.Tensor):
    """CRIS's CLIP.encode_text: normed word features (not projected) and the projected EOT state."""
    x = clip.token_embedding(ids) + clip.positional_embedding[: ids.shape[1]]
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    return x, x[torch.arange(len(x)), ids.argmax(-1)] @ clip.text_projection


def ref_neck(neck, v3, v4, v5, state):
    state = neck.txt_proj(state).unsqueeze(-1).unsqueeze(-1)
    f5 = neck.norm_layer(neck.f1_v_proj(v5) * state)
    f4 = neck.f2_cat(torch.cat([neck.f2_v_proj(v4), F.interpolate(f5, scale_factor=2, mode="bilinear")], dim=1))
    f3 = neck.f3_cat(torch.cat([F.avg_pool2d(neck.f3_v_proj(v3), 2, 2), f4], dim=1))
    fq5 = F.interpolate(neck.f4_proj5(f5), scale_factor=2, mode="bilinear")
    fq = neck.aggr(torch.cat([neck.f4_proj3(f3), neck.f4_proj4(f4), fq5], dim=1))
    coord = neck.coordconv[0]
    b, _, h, w = fq.shape
    y, x = torch.meshgrid(torch.linspace(-1, 1, h, dtype=fq.dtype), torch.linspace(-1, 1, w, dtype=fq.dtype), indexing="ij")
    fq = coord.conv1(torch.cat([fq, x.expand([b, 1, -1, -1]), y.expand([b, 1, -1, -1])], 1))
    return neck.coordconv[1](fq)


def ref_decoder(decoder, vis, txt, pad_mask):
    b, c, h, w = vis.shape
    vis_pos, txt_pos = ref_pos2d(c, h, w, vis), ref_pos1d(txt.shape[-1], txt.shape[1], txt)
    out, txt = vis.reshape(b, c, -1).permute(2, 0, 1), txt.permute(1, 0, 2)
    for layer in decoder.layers:
        v2 = layer.norm1(out)
        v2 = layer.self_attn(v2 + vis_pos, v2 + vis_pos, value=v2)[0]
        out = out + layer.self_attn_norm(v2)
        v2 = layer.multihead_attn(query=layer.norm2(out) + vis_pos, key=txt + txt_pos, value=txt,
                                  key_padding_mask=pad_mask)[0]
        out = out + layer.cross_attn_norm(v2)
        out = out + layer.ffn(layer.norm3(out))
    return decoder.norm(out).permute(1, 2, 0)


def ref_projector(proj, x, word):
    x = proj.vis(x)
    b, c, h, w = x.shape
    word = proj.txt(word)
    weight, bias = word[:, :-1].reshape(b, c, proj.kernel_size, proj.kernel_size), word[:, -1]
    return F.conv2d(x.reshape(1, b * c, h, w), weight, padding=proj.kernel_size // 2, groups=b, bias=bias).transpose(0, 1)


def ref_cris(clip, head, x, ids, size, additive=None, ratio=None):
    """COOPCRIS.forward with the context already in the token embeddings (what CoOp's ctx_init
    gives); with ``additive`` (its ``additive_decoder_layer``) mixed in by ``ratio``."""
    v3, v4, v5 = ref_image(clip, head.connect, x)
    words, state = ref_text(clip, ids)
    pad_mask = ids == 0
    fq = ref_neck(head.neck, v3, v4, v5, state)
    b, c, h, w = fq.shape
    fq = ref_decoder(head.decoder, fq, words, pad_mask).reshape(b, c, h, w)
    logits = F.interpolate(ref_projector(head.proj, fq, state), size, mode="bicubic", align_corners=True)
    return logits if additive is None else (1 - ratio) * logits + ratio * additive(fq)


# -- tests --------------------------------------------------------------------------------------------
def test_the_head_is_sized_like_cris_for_the_backbone(rn_backbone):
    head = CRISHead.for_backbone(rn_backbone, **HEAD)
    widths = rn_backbone.image_map_widths
    assert head.layout()["fpn_in"] == [widths[1], widths[2], 24] and head.layout()["fpn_out"] == [16, 32, 24]
    assert head.connect[0].in_channels == widths[3] and head.proj.txt.out_features == 16 * 9 + 1
    with pytest.raises(ValueError, match="equal fpn_out"):
        CRISHead([8, 16, 24], [8, 12, 24], 16, 24)


def test_segmenter_forward_is_the_reference_cris_in_float64(rn_backbone):
    model = segmenter(rn_backbone).double()
    x = images().double()
    ours = model(x, PROMPTS)
    # CoOp's context initialised from "a photo of a" is those words' embeddings: TuneVLSeg's
    # CoOpContextLearner builds the same sequence (start token, context, prompt, stop, end).
    ids = rn_backbone.tokenize(["a photo of a red circle.", "a photo of a blue square.", "a photo of a red circle."])
    ref = ref_cris(rn_backbone.model, model.decoder, x, ids, (64, 64))
    assert ours.shape == (3, 1, 64, 64)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    model.float()


def test_cocoop_is_given_c5_averaged_over_positions(rn_backbone, monkeypatch):
    model = segmenter(rn_backbone, CoCoOpPromptLearner)
    seen = []
    original = model.prompt_learner.text_features
    monkeypatch.setattr(model.prompt_learner, "text_features", lambda f=None: seen.append(f) or original(f))
    x = images()
    model(x, PROMPTS)
    with torch.no_grad():
        c5 = ref_image(rn_backbone.model, model.decoder.connect, x)[2]
    torch.testing.assert_close(seen[0], c5.mean((2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learner", [CoOpPromptLearner, CoCoOpPromptLearner])
def test_gradients_reach_only_the_prompt(rn_backbone, learner):
    model = segmenter(rn_backbone, learner)
    model.train()
    # a frozen head keeps its statistics and its dropout off (TuneVLSeg's frozen CRIS trains its BatchNorms)
    assert not any(m.training for m in model.decoder.modules() if m is not model.decoder)
    model(images(), PROMPTS).sum().backward()
    learned = [p for p in model.prompt_learner.parameters() if p.requires_grad]
    assert learned and all(p.grad is not None for p in learned) and model.prompt_learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*model.decoder.parameters(), *rn_backbone.parameters()])


def test_a_trained_head_trains_and_round_trips_with_the_prompt(rn_backbone, tmp_path):
    model = segmenter(rn_backbone, train_decoder=True)
    model.train()
    assert model.decoder.decoder.training  # dropout on while it trains
    model(images(), PROMPTS).sum().backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    with torch.no_grad():
        model.prompt_learner.ctx.add_(0.1)
    model.eval()
    before = model(images(), PROMPTS)
    folder = model.save_prompt(tmp_path / "cris-prompt")
    again = PromptSegmenter(rn_backbone, functools.partial(CoOpPromptLearner, n_ctx=4), init_prompt=str(folder)).eval()
    assert isinstance(again.decoder, CRISHead) and again.decoder.layout() == model.decoder.layout()
    torch.testing.assert_close(again(images(), PROMPTS), before)


def test_cris_and_clipseg_heads_refuse_each_other(rn_backbone, backbone, tmp_path):
    cris = save_decoder_weights(segmenter(rn_backbone).decoder, tmp_path / "cris.safetensors")
    clipseg = save_decoder_weights(CLIPSegDecoder.for_backbone(backbone, reduce_dim=16, n_heads=2),
                                   tmp_path / "clipseg.safetensors")
    with pytest.raises(ValueError, match="holds a cris head, not a clipseg-style one"):
        load_decoder_weights(CLIPSegDecoder.for_backbone(backbone, reduce_dim=16, n_heads=2), cris)
    with pytest.raises(ValueError, match="not a CRIS head"):
        build_head(rn_backbone, "cris", None, 64, 4, str(clipseg))
    with pytest.raises(ValueError, match="ResNet image tower"):
        build_head(backbone, "cris", None, 64, 4, None)
    # a CRIS prompt (ResNet CLIP) into a CLIPSeg segmenter (ViT CLIP): another backbone, refused
    folder = segmenter(rn_backbone, train_decoder=True).save_prompt(tmp_path / "prompt")
    with pytest.raises(ValueError, match="(?i)backbone|another"):
        PromptSegmenter(backbone, functools.partial(CoOpPromptLearner, n_ctx=4), init_prompt=str(folder))


@pytest.mark.parametrize("name", ["vpt", "maple"])
def test_visual_prompt_strategies_are_refused(rn_backbone, name):
    from vlprompt.prompts import PROMPT_LEARNERS

    with pytest.raises((ValueError, NotImplementedError), match="ViT"):
        PromptSegmenter(rn_backbone, PROMPT_LEARNERS[name], head="cris")


def test_word_features_are_captured_from_the_learners_own_pass(rn_backbone):
    ids = rn_backbone.tokenize(["a red circle.", "blue!"])
    with rn_backbone.capture_text_tokens() as captured:
        pooled = rn_backbone.encode_text(ids)
    words, state = ref_text(rn_backbone.model, ids)
    tokens = captured[0]
    torch.testing.assert_close(tokens.state, pooled)
    torch.testing.assert_close(tokens.state, state, rtol=1e-5, atol=1e-6)
    length = tokens.words.shape[1]  # cut after the longest end-of-text: the rest is padding
    assert length == int(ids.argmax(-1).max()) + 1
    # TuneVLSeg pads by the tokenizer's attention mask: everything after the end-of-text token
    # ("!" has id 0 in CLIP's vocabulary, so input_ids == 0 would mask it too).
    assert tokens.padding.tolist() == [[False] * length, [False] * 4 + [True] * (length - 4)]
    valid = ~tokens.padding
    torch.testing.assert_close(tokens.words[valid], words[:, :length][valid], rtol=1e-5, atol=1e-6)


def test_cris_checkpoints_convert_to_an_open_clip_folder_and_a_head(rn_backbone, tmp_path):
    """CRIS's checkpoint layout (distributed ``module.`` prefix, ``backbone.`` = OpenAI CLIP with
    CRIS's ``connect`` inside the attention pool, ``neck``/``decoder``/``proj``) round-trips."""
    from vlprompt.seg.cris_checkpoint import write_cris_checkpoint

    model = segmenter(rn_backbone).eval()
    head = model.decoder
    state = {f"backbone.{k}": v for k, v in rn_backbone.model.state_dict().items()}
    state.update({f"backbone.visual.attnpool.{k}": v for k, v in head.state_dict().items() if k.startswith("connect.")})
    state.update({k: v for k, v in head.state_dict().items() if not k.startswith("connect.")})
    torch.save({"epoch": 50, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "best_model.pth")
    out = write_cris_checkpoint(tmp_path / "best_model.pth", tmp_path / "cris", num_heads=2, dropout=0.2,
                                head_width=16)
    backbone = OpenCLIPBackbone(f"local-dir:{out}")
    again = PromptSegmenter(backbone, functools.partial(CoOpPromptLearner, n_ctx=4, ctx_init="a photo of a"),
                            head="cris", decoder_weights=str(out / "cris_head.safetensors")).eval()
    assert again.decoder.layout() == head.layout()
    torch.testing.assert_close(again(images(), PROMPTS), model(images(), PROMPTS))
    with pytest.raises(ValueError, match="not a CRIS checkpoint"):
        torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, tmp_path / "other.pth")
        write_cris_checkpoint(tmp_path / "other.pth", tmp_path / "x")


def test_the_embedded_cris_loads_with_its_borrowed_text_tower_and_head():
    from vlprompt.zoo import decoder_weights_path, shared_tower_weights

    backbone = OpenCLIPBackbone("zoo:shapeworld-cris-tiny")
    lender = OpenCLIPBackbone("zoo:shapeworld-clip-tiny")
    assert backbone.has_image_maps and not lender.has_image_maps
    torch.testing.assert_close(backbone.encode_text(["a red star"]), lender.encode_text(["a red star"]), rtol=0, atol=0)
    assert len(shared_tower_weights("zoo:shapeworld-cris-tiny")) == len(backbone.model.state_dict())
    model = PromptSegmenter(backbone, decoder_weights="zoo:shapeworld-cris-tiny")  # head="auto": CRIS's
    assert isinstance(model.decoder, CRISHead) and decoder_weights_path("shapeworld-cris-tiny").name == "cris_head.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("learner", ["CoOpPromptLearner", "CoCoOpPromptLearner"])
def test_cli_trains_saves_and_segments_on_the_embedded_cris(tmp_path, learner):
    import csv

    from vlprompt.cli import main
    from vlprompt.resources import bundled_dir

    config = str(bundled_dir("configs") / "seg" / "shapeworld_cris_coop.yaml")
    args = ["--data.init_args.root", str(tmp_path / "seg"), "--trainer.logger", "false",
            "--model.init_args.prompt_learner", f"vlprompt.prompts.{learner}", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    main(["fit", "--config", config, *args, "--trainer.default_root_dir", str(tmp_path / "run"),
          "--save_prompt", str(tmp_path / "prompt")])
    saved = json.loads((tmp_path / "prompt" / "config.json").read_text())
    assert saved["backbone"]["name"] == "zoo:shapeworld-cris-tiny"
    images_ = sorted((tmp_path / "seg" / "images").glob("test_*.png"))[:2]
    main(["segment", "--images", *map(str, images_), "--text", "red star", "--prompt", str(tmp_path / "prompt"),
          "--backbone", "zoo:shapeworld-cris-tiny", "--out", str(tmp_path / "out"), "--device", "cpu"])
    rows = list(csv.DictReader(open(tmp_path / "out" / "segments.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # the CRIS prompt on the embedded CLIP: another backbone, refused
    with pytest.raises(SystemExit):
        main(["segment", "--images", str(images_[0]), "--text", "red star", "--prompt", str(tmp_path / "prompt"),
              "--backbone", "zoo:shapeworld-clip-tiny", "--out", str(tmp_path / "out2"), "--device", "cpu"])


def test_segment_takes_the_backbone_and_head_a_saved_prompt_records(tmp_path):
    """`vlprompt segment --prompt P` without --backbone segments with the VLSM the prompt was learned
    on (here the embedded CRIS and its shipped head), as with --backbone named."""
    import csv

    import numpy as np
    from PIL import Image

    from vlprompt.cli import main

    backbone = OpenCLIPBackbone("zoo:shapeworld-cris-tiny")
    model = PromptSegmenter(backbone, functools.partial(CoOpPromptLearner, n_ctx=2),
                            decoder_weights="zoo:shapeworld-cris-tiny")
    prompt = model.save_prompt(tmp_path / "prompt")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    masks = []
    for name, backbone_args in (("recorded", []), ("named", ["--backbone", "zoo:shapeworld-cris-tiny"])):
        main(["segment", "--images", str(tmp_path / "a.png"), "--text", "red star", "--prompt", str(prompt),
              *backbone_args, "--out", str(tmp_path / name), "--device", "cpu"])
        row = next(csv.DictReader(open(tmp_path / name / "segments.csv")))
        masks.append(np.asarray(Image.open(row["mask"])))
    assert np.array_equal(*masks)  # one model, one computation


@pytest.mark.slow
def test_the_demo_table_runs_cris_beside_clipseg(tmp_path):
    import yaml

    from vlprompt.apps.segmentation import SegmentationEvalConfig, run_segmentation_eval
    from vlprompt.resources import bundled_dir

    raw = yaml.safe_load((bundled_dir("configs") / "seg" / "shapeworld_demo.yaml").read_text())
    seg = raw["segmentation"]
    seg["data"]["init_args"]["root"] = str(tmp_path / "seg")
    seg["methods"] = {k: seg["methods"][k] for k in ("cris_zero_shot", "cris_coop")}
    seg["methods"]["cris_coop"]["config"] = str(bundled_dir("configs") / "methods" / "coop.yaml")
    seg["methods"]["cris_coop"]["trainer"] = {"max_epochs": 2}
    seg.update(zeroshot=False, overlays=0)
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    rows = run_segmentation_eval(SegmentationEvalConfig.read(path), tmp_path / "out")
    assert list(rows) == ["cris_zero_shot", "cris_coop"]
    assert rows["cris_coop"]["dice_dataset"] > rows["cris_zero_shot"]["dice_dataset"] + 0.1


def test_a_template_ensemble_is_refused(rn_backbone):
    from vlprompt.prompts import ZeroShotPrompt

    model = PromptSegmenter(rn_backbone, functools.partial(ZeroShotPrompt, templates=["a {}.", "the {}."]),
                            head="cris", head_options=HEAD)
    with pytest.raises(ValueError, match="2 passes"):
        model(images(), PROMPTS)


def test_the_new_last_layer_is_tunevlsegs_on_cris(rn_backbone, tmp_path):
    model = segmenter(rn_backbone, new_last_layer=True, residual_ratio=0.3)
    with torch.no_grad():
        model.last_layer.residual_ratio.fill_(0.3)
    model.train()
    model(images(), PROMPTS).sum().backward()
    trained = [*model.prompt_learner.parameters(), *model.last_layer.parameters()]
    assert all(p.grad is not None for p in trained)
    assert all(p.grad is None for p in [*model.decoder.parameters(), *rn_backbone.parameters()])
    model.double().eval()
    layer = model.last_layer
    additive = torch.nn.Sequential(layer.reduce, torch.nn.Upsample(size=(64, 64), mode="bilinear"), layer.conv)
    assert layer.reduce.in_channels == model.decoder.proj.in_dim * 2 and layer.conv.padding_mode == "replicate"
    ids = rn_backbone.tokenize(["a photo of a red circle.", "a photo of a blue square.", "a photo of a red circle."])
    ref = ref_cris(rn_backbone.model, model.decoder, images().double(), ids, (64, 64), additive, layer.residual_ratio)
    torch.testing.assert_close(model(images().double(), PROMPTS), ref, rtol=0, atol=1e-10)
    model.float()
    folder = model.save_prompt(tmp_path / "with-last-layer")
    again = PromptSegmenter(rn_backbone, functools.partial(CoOpPromptLearner, n_ctx=4), head="cris", head_options=HEAD,
                            init_prompt=str(folder))
    torch.testing.assert_close(again.last_layer.residual_ratio, model.last_layer.residual_ratio)
    with pytest.raises(ValueError, match="ratio only"):
        segmenter(rn_backbone, new_last_layer=True, new_last_layer_mix="sum")
