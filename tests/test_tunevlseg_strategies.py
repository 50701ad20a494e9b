"""TuneVLSeg's shared-separate and shared-attention strategies on CLIPSeg, with its way of carrying
visual prompts through the decoder and its "new last layer": vlprompt's segmenter against a small,
independent re-statement of TuneVLSeg's computation (``BaseMultimodalCLIPSeg`` and its learners),
on a tiny random CLIPSeg in float64; gradients reach only what is learned; save/load round trip;
the CLI trains, saves and segments with both strategies on the embedded default."""

from __future__ import annotations

import csv
import functools

import pytest
import torch
import torch.nn.functional as F

from test_hf_clipseg import images, tiny_clipseg
from vlprompt.backbones import HFCLIPBackbone
from vlprompt.methods import PromptSegmenter
from vlprompt.prompts import SharedAttentionPromptLearner, SharedSeparatePromptLearner

transformers = pytest.importorskip("transformers")
pytest.importorskip("monai")

PROMPTS = ["a red star", "blue circle", "a red star"]


@pytest.fixture(scope="module")
def clipseg(tmp_path_factory):
    folder = tiny_clipseg(tmp_path_factory.mktemp("clipseg"))
    model = transformers.CLIPSegForImageSegmentation.from_pretrained(folder).double().eval()
    backbone = HFCLIPBackbone(str(folder), local_files_only=True).double()
    return model, transformers.AutoTokenizer.from_pretrained(folder), backbone


# -- TuneVLSeg, re-stated -------------------------------------------------------------------------
def run_layer(layer, x):
    out = layer(x, None, None) if "causal_attention_mask" in layer.forward.__code__.co_varnames else layer(x, None)
    return out[0] if isinstance(out, tuple) else out


def separate_prompts(learner):
    """SharedSeparateLearner: each depth's shared context through its own text and visual Linear."""
    text = [F.linear(learner.ctx[i], p.weight, p.bias) for i, p in enumerate(learner.text_projections)]
    visual = [F.linear(learner.ctx[i], p.weight, p.bias) for i, p in enumerate(learner.visual_projections)]
    return text, visual


def attention_prompts(learner, text_width):
    """SharedAttnLearner (evaluation): a sequence-first TransformerEncoderLayer fed ``ctx[i][None]``
    sees n_ctx sequences of one token, so attention returns each token's own value: pre-norm,
    value and output projections, residual; pre-norm feed-forward (ReLU), residual."""
    text, visual = [], []
    for i, layer in enumerate(learner.mixers):
        x, width = learner.ctx[i], learner.ctx.shape[-1]
        attn = layer.self_attn
        value = F.linear(F.layer_norm(x, (width,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps),
                         attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
        x = x + F.linear(value, attn.out_proj.weight, attn.out_proj.bias)
        h = F.layer_norm(x, (width,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
        x = x + layer.linear2(F.relu(layer.linear1(h)))
        text.append(x[:, :text_width])
        visual.append(x[:, text_width:])
    return text, visual


def tunevlseg_text(model, tokenizer, texts, text_prompts):
    """BaseMultimodalCLIPSeg.text_model_forward: context after the start token, positions over the
    longer sequence, deep prompts put in after each block, pooled at the end token shifted by n."""
    tm = model.clip.text_model
    ids = tokenizer(texts, padding=True, return_tensors="pt")
    n, batch = text_prompts[0].shape[0], len(texts)
    emb = tm.embeddings.token_embedding(ids.input_ids)
    x = torch.cat([emb[:, :1], text_prompts[0].expand(batch, -1, -1), emb[:, 1:]], dim=1)
    length = x.shape[1]
    x = x + tm.embeddings.position_embedding.weight[:length]
    causal = torch.full((length, length), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
    pad = torch.cat([torch.ones(batch, n, dtype=torch.long), ids.attention_mask], dim=1)
    mask = causal[None, None] + (1.0 - pad[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    for idx, layer in enumerate(tm.encoder.layers, 1):
        x = layer(x, mask)[0] if isinstance(layer(x, mask), tuple) else layer(x, mask)
        if idx < len(text_prompts):
            x = torch.cat([x[:, :1], text_prompts[idx].expand(batch, -1, -1), x[:, 1 + n:]], dim=1)
    x = tm.final_layer_norm(x)
    eot = (ids.input_ids == tm.config.eos_token_id).int().argmax(-1) + n
    return model.clip.text_projection(x[torch.arange(batch), eot])


def tunevlseg_logits(model, tokenizer, pixels, texts, text_prompts, visual_prompts, last_layer=None):
    """BaseMultimodalCLIPSeg.model_forward with BaseCLIPSeg.decoder_forward."""
    vm, n, batch = model.clip.vision_model, visual_prompts[0].shape[0], len(pixels)
    x = torch.cat([vm.embeddings(pixels), visual_prompts[0].expand(batch, -1, -1)], dim=1)
    states = [vm.pre_layrnorm(x)]
    x = states[0]
    for idx, layer in enumerate(vm.encoder.layers, 1):
        x = run_layer(layer, x)
        if idx < len(visual_prompts):  # in place in TuneVLSeg: the decoder reads the replaced tokens too
            x = torch.cat([x[:, :-n], visual_prompts[idx].expand(batch, -1, -1)], dim=1)
        states.append(x)
        if idx > max(model.extract_layers):
            break
    activations = [states[i + 1] for i in model.extract_layers]
    cond = tunevlseg_text(model, tokenizer, texts, text_prompts)
    d = model.decoder
    out = torch.zeros(model.config.reduce_dim, dtype=x.dtype)
    for i, (act, layer, reduce) in enumerate(zip(activations[::-1], d.layers, d.reduces)):
        out = reduce(act) + out
        if i == d.conditional_layer:
            out = (d.film_mul(cond) * out.permute(1, 0, 2) + d.film_add(cond)).permute(1, 0, 2)
        out = run_layer(layer, out)
    out = out[:, 1:-n].permute(0, 2, 1)
    size = int(out.shape[-1] ** 0.5)
    out = out.reshape(batch, -1, size, size)
    logits = d.transposed_convolution(out)
    if last_layer is not None:
        r = last_layer.residual_ratio
        logits = (1 - r) * logits + r * last_layer.conv(out)
    return logits.reshape(batch, 1, *pixels.shape[-2:])


# -- tests ---------------------------------------------------------------------------------------
STRATEGIES = {
    "shared_separate": (functools.partial(SharedSeparatePromptLearner, n_ctx=3, depth=3, shared_dim=8),
                        lambda learner, backbone: separate_prompts(learner)),
    "shared_attention": (functools.partial(SharedAttentionPromptLearner, n_ctx=3, depth=3, heads=4, feedforward=24),
                         lambda learner, backbone: attention_prompts(learner, backbone.text_width)),
}


def segmenter(backbone, name, **kwargs):
    torch.manual_seed(0)
    seg = PromptSegmenter(backbone, STRATEGIES[name][0], carry_visual_prompts=True, new_last_layer=True, **kwargs)
    with torch.no_grad():  # away from the initial values, so every term counts
        for p in seg.prompt_learner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        seg.last_layer.residual_ratio.fill_(0.3)
    return seg.double().eval()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_forward_is_tunevlseg_on_clipseg(clipseg, name):
    model, tokenizer, backbone = clipseg
    seg = segmenter(backbone, name)
    pixels = images().double()
    with torch.no_grad():
        ours = seg(pixels, PROMPTS)
        text, visual = STRATEGIES[name][1](seg.prompt_learner, backbone)
        texts = [p + "." for p in PROMPTS]  # TuneVLSeg's insert_stop_at_last, as vlprompt's prompts
        theirs = tunevlseg_logits(model, tokenizer, pixels, texts, text, visual, seg.last_layer)
    assert ours.shape == theirs.shape == (3, 1, 48, 48)
    # float64 throughout; the head hands its logits back in float32 (about 1e-7 relative)
    assert torch.allclose(ours.double(), theirs, rtol=1e-6, atol=1e-6), (ours - theirs).abs().max()


def test_dropping_the_prompts_before_the_decoder_differs(clipseg):
    _, _, backbone = clipseg
    seg = segmenter(backbone, "shared_separate")
    with torch.no_grad():
        carried = seg(images().double(), PROMPTS)
        seg.carry_visual_prompts = False
        dropped = seg(images().double(), PROMPTS)
    assert not torch.allclose(carried, dropped)


def test_one_attention_pass_serves_both_towers_in_training(clipseg):
    _, _, backbone = clipseg
    learner = segmenter(backbone, "shared_attention").prompt_learner.train()
    for p in learner.mixers.parameters():
        assert p.dtype == torch.float64
    learner.mixers[0].dropout1.p = learner.mixers[0].dropout.p = 0.5
    torch.manual_seed(1)
    visual, text = learner.visual_prompts(), learner.text_prompts()
    torch.manual_seed(1)
    whole_text, whole_visual = learner.layer_prompts()
    assert all(torch.equal(a, b) for a, b in zip(text + visual, whole_text + whole_visual))
    assert not torch.equal(learner.text_prompts()[0], text[0])  # taken once: the next request is a new pass


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_gradients_reach_only_the_prompt_and_the_new_last_layer(clipseg, name):
    _, _, backbone = clipseg
    seg = segmenter(backbone, name).train()
    seg(images().double(), PROMPTS).sum().backward()
    assert all(p.grad is None for p in seg.backbone.parameters())
    assert all(p.grad is None for p in seg.decoder.parameters())
    learned = list(seg.prompt_learner.parameters()) + list(seg.last_layer.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)
    assert {id(p) for p in seg.trainable_parameters()} == {id(p) for p in learned}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_save_and_load_round_trip(clipseg, name, tmp_path):
    _, _, backbone = clipseg
    seg = segmenter(backbone, name)
    seg.save_prompt(tmp_path / "prompt")
    assert (tmp_path / "prompt" / "last_layer.safetensors").is_file()
    torch.manual_seed(5)
    # neither the new last layer nor carrying is configured: both come with the prompt
    loaded = PromptSegmenter(backbone, STRATEGIES[name][0], init_prompt=str(tmp_path / "prompt")).double().eval()
    assert loaded.carry_visual_prompts and loaded.last_layer is not None
    with torch.no_grad():
        assert torch.equal(loaded(images().double(), PROMPTS), seg(images().double(), PROMPTS))


def test_carrying_needs_prompts_after_the_patches(clipseg):
    from vlprompt.prompts import VPTPromptLearner

    _, _, backbone = clipseg
    seg = PromptSegmenter(backbone, functools.partial(VPTPromptLearner, n_tokens=2, depth=1, templates="{}"),
                          carry_visual_prompts=True).double()
    with pytest.raises(ValueError, match="after the patches"):
        seg(images().double(), PROMPTS)


def test_new_last_layer_sum_mix_and_bad_mix():
    from vlprompt.seg.last_layer import NewLastLayer

    torch.manual_seed(0)
    layer = NewLastLayer(4, (2, 2), mix="sum")
    grid, logits = torch.randn(2, 4, 3, 3), torch.randn(2, 1, 6, 6)
    up = F.interpolate(grid, scale_factor=2.0, mode="bilinear", align_corners=False)
    expected = logits + F.conv2d(F.pad(up, (2, 2, 2, 2), mode="replicate"), layer.conv[1].weight, layer.conv[1].bias)
    assert torch.allclose(layer(grid, logits), expected, atol=1e-6)
    assert not hasattr(layer, "residual_ratio")
    with pytest.raises(ValueError, match="ratio"):
        NewLastLayer(4, (2, 2), mix="mean")


def test_deep_cocoop_is_tunevlsegs_cocoop_at_every_depth(clipseg):
    """COOPCLIPSeg with CoCoOpContextLearner: per depth ``ctx[i] + LayerNorm(W2 relu(W1 f + b1))``
    (no final bias, LayerNorm without bias) from CLIP's projected image embedding ``f``; depth 0
    after the start token, deeper ones put in after each text block; then transformers' decoder."""
    from vlprompt.prompts import DeepCoCoOpPromptLearner

    model, tokenizer, backbone = clipseg
    torch.manual_seed(0)
    seg = PromptSegmenter(backbone, functools.partial(DeepCoCoOpPromptLearner, depth=3)).double().eval()
    learner = seg.prompt_learner
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pixels = images().double()
    with torch.no_grad():
        ours = seg(pixels, PROMPTS)
        vision = model.clip.vision_model(pixel_values=pixels, output_hidden_states=True)
        f = model.clip.visual_projection(vision.pooler_output)
        bases = [learner.ctx, *learner.deep_ctx]
        conds = []
        for b, text in enumerate(PROMPTS):
            prompts = []
            for i, (base, net) in enumerate(zip(bases, learner.meta_nets)):
                h = F.relu(F.linear(f[b], net[0].weight, net[0].bias))
                shift = F.layer_norm(F.linear(h, net[2].weight), (net[2].out_features,), net[3].weight)
                prompts.append(base + shift)
            conds.append(tunevlseg_text(model, tokenizer, [text + "."], prompts)[0])
        activations = [vision.hidden_states[i + 1] for i in model.extract_layers]
        theirs = model.decoder(activations, torch.stack(conds)).logits
    assert net[2].bias is None and net[3].bias is None
    assert torch.allclose(ours[:, 0].double(), theirs, rtol=1e-6, atol=1e-6), (ours[:, 0] - theirs).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("learner", ["SharedSeparatePromptLearner", "SharedAttentionPromptLearner"])
def test_cli_trains_saves_and_segments_on_the_embedded_default(tmp_path, learner):
    from vlprompt.cli import main
    from vlprompt.resources import bundled_dir

    config = str(bundled_dir("configs") / "seg" / "shapeworld_coop.yaml")
    args = ["--data.init_args.root", str(tmp_path / "seg"), "--trainer.logger", "false",
            "--model.init_args.prompt_learner", f"vlprompt.prompts.{learner}", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    main(["fit", "--config", config, *args, "--trainer.default_root_dir", str(tmp_path / "run"),
          "--save_prompt", str(tmp_path / "prompt")])
    assert (tmp_path / "prompt" / "config.json").is_file()
    images_ = sorted((tmp_path / "seg" / "images").glob("test_*.png"))[:2]
    main(["segment", "--images", *map(str, images_), "--text", "red star", "--prompt", str(tmp_path / "prompt"),
          "--out", str(tmp_path / "out"), "--device", "cpu"])
    rows = list(csv.DictReader(open(tmp_path / "out" / "segments.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]


@pytest.mark.slow
def test_cli_runs_the_tunevlseg_recipe_and_segments_with_what_it_saved(tmp_path):
    """configs/seg/tunevlseg_recipe.yaml (plateau schedule, TuneVLSeg's augmentation, carried visual
    prompts, here with the new last layer) on a tiny CLIPSeg; `vlprompt segment --prompt` then
    gives the masks of the trained segmenter."""
    import numpy as np
    from PIL import Image

    from test_seg_data import make_tunevlseg
    from vlprompt.cli import main
    from vlprompt.resources import bundled_dir

    folder = tiny_clipseg(tmp_path / "clipseg")
    data = make_tunevlseg(tmp_path / "data", size=(40, 40))
    config = str(bundled_dir("configs") / "seg" / "tunevlseg_recipe.yaml")
    main(["fit", "--config", config, "--model.init_args.backbone.init_args.model_name", f"hf:{folder}",
          "--model.init_args.new_last_layer", "true", "--data.init_args.root", str(data),
          "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2", "--trainer.max_epochs", "2",
          "--trainer.min_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path / "run"), "--save_prompt", str(tmp_path / "prompt")])
    saved = {p.name for p in (tmp_path / "prompt").iterdir()}
    assert {"config.json", "last_layer.safetensors", "segmentation.json"} <= saved
    photo = tmp_path / "photos" / "a.png"
    photo.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(photo)
    main(["segment", "--images", str(photo), "--text", "a red star", "--backbone", f"hf:{folder}",
          "--prompt", str(tmp_path / "prompt"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    row = next(csv.DictReader(open(tmp_path / "out" / "segments.csv")))
    mask = np.asarray(Image.open(row["mask"])) > 0
    backbone = HFCLIPBackbone(f"hf:{folder}", local_files_only=True)
    seg = PromptSegmenter(backbone, functools.partial(SharedSeparatePromptLearner),
                          init_prompt=str(tmp_path / "prompt")).eval()
    from vlprompt.data.images import build_eval_transform

    pixels = build_eval_transform({**backbone.preprocess_cfg, "resize_mode": "squash"})(Image.open(photo))[None]
    with torch.no_grad():
        expected = seg(pixels, ["a red star"])[0, 0].sigmoid().numpy() > 0.5
    assert (mask == expected).mean() > 0.999


def test_plateau_schedule_is_tunevlsegs(clipseg):
    _, _, backbone = clipseg
    seg = PromptSegmenter(backbone, STRATEGIES["shared_separate"][0], lr_scheduler="plateau",
                          optimizer=lambda p: torch.optim.AdamW(p, lr=2e-4))
    built = seg.configure_optimizers()
    scheduler = built["lr_scheduler"]
    plateau = scheduler["scheduler"]
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (plateau.mode, plateau.factor, plateau.patience) == ("min", 0.2, 5)
    assert (scheduler["monitor"], scheduler["interval"], scheduler["frequency"]) == ("val/loss", "epoch", 1)
    assert built["optimizer"].param_groups[0]["weight_decay"] == 0.01  # AdamW's default, as TuneVLSeg gets it


def test_the_recipe_config_holds_tunevlsegs_values():
    import yaml

    from vlprompt.resources import bundled_dir

    cfg = yaml.safe_load((bundled_dir("configs") / "seg" / "tunevlseg_recipe.yaml").read_text())
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert model["optimizer"] == {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2.0e-4, "weight_decay": 0.01}}
    assert (model["lr_scheduler"], model["plateau_factor"], model["plateau_patience"]) == ("plateau", 0.2, 5)
    assert (model["lambda_dice"], model["lambda_bce"], model["train_decoder"]) == (1.0, 0.2, False)
    assert (trainer["max_epochs"], trainer["min_epochs"]) == (20, 10)
    assert (data["size"], data["interpolation"], data["area_downscale"], data["augmentation"], data["hflip"]) == (
        352, "bicubic", False, "tunevlseg", False)


def test_bad_settings_are_refused_in_one_line(clipseg):
    _, _, backbone = clipseg
    with pytest.raises(ValueError, match=r"heads=3 must divide the joint width 80 \(text 48 \+ vision 32\)"):
        SharedAttentionPromptLearner(backbone, ["x"], heads=3)
    with pytest.raises(ValueError, match=r"depth must be between 1 and 3 \(the shallower tower's layers\), got 4"):
        SharedSeparatePromptLearner(backbone, ["x"], depth=4)


def test_vlprompts_decoder_drops_carried_prompts_after_its_blocks_and_mixes_the_last_layer(backbone):
    """vlprompt's CLIPSeg-style decoder (the embedded default's head) with prompt tokens after the
    patches: they pass through its blocks and are dropped before the grid, as TuneVLSeg does."""
    from vlprompt.seg.decoder import CLIPSegDecoder
    from vlprompt.seg.last_layer import NewLastLayer

    torch.manual_seed(0)
    decoder = CLIPSegDecoder.for_backbone(backbone, reduce_dim=8, n_heads=2).eval()
    last = NewLastLayer(8, backbone.patch_size)
    with torch.no_grad():
        last.residual_ratio.fill_(0.3)
    (ph, pw), size, n = backbone.patch_size, (32, 32), 3
    h, w = size[0] // ph, size[1] // pw
    tokens = [torch.randn(2, 1 + h * w + n, backbone.vision_width) for _ in decoder.extract_layers]
    cond = torch.randn(2, backbone.embed_dim)
    with torch.no_grad():
        ours = decoder(tokens, cond, 1, size, trailing_tokens=n, last_layer=last)
        a = None
        for i, (t, reduce, block) in enumerate(zip(tokens[::-1], decoder.reduces, decoder.blocks)):
            a = reduce(t) if a is None else a + reduce(t)
            if i == 0:
                a = decoder.film_mul(cond)[:, None] * a + decoder.film_add(cond)[:, None]
            a = block(a)
        grid = a[:, 1:-n].transpose(1, 2).reshape(2, 8, h, w)
        up = F.interpolate(grid, scale_factor=(float(ph) if ph == pw else (ph, pw)), mode="bilinear")
        conv = F.conv2d(F.pad(up, (2, 2, 2, 2), mode="replicate"), last.conv[1].weight, last.conv[1].bias)
        expected = 0.7 * decoder.trans_conv(grid) + 0.3 * conv
    assert torch.allclose(ours, expected, atol=1e-6)
