"""Dataset formats, few-shot sampling, base/novel subsets and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import COLOURS
from vlprompt.data import FewShotDataModule, ImageDataset, collate_skipping, read_csv_splits, subset_classes
from vlprompt.data.fewshot import sample_few_shot
from vlprompt.data.sources import Sample

NAMES = list(COLOURS)


def test_dassl_split_is_read_as_is(dassl_folder):
    dm = FewShotDataModule(str(dassl_folder), shots=-1, num_workers=0)
    assert dm.classnames == NAMES
    assert [len(dm.samples.split(s)) for s in ("train", "val", "test")] == [32, 16, 24]
    dm.setup("fit")
    item = dm.datasets["train"][0]
    assert item["image"].shape == (3, 224, 224)  # CLIP defaults until a backbone hands its own
    dm.set_preprocess({"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic", "resize_mode": "shortest"})
    assert dm.datasets["train"][0]["image"].shape == (3, 32, 32)


def test_imagefolder_splits_every_class(image_folder):
    dm = FewShotDataModule(str(image_folder), shots=-1, num_workers=0)
    assert dm.classnames == sorted(NAMES)  # folder names, underscores become spaces
    s = dm.samples
    assert len(s.train) + len(s.val) + len(s.test) == 40
    assert {x.label for x in s.train} == {x.label for x in s.test} == {0, 1, 2, 3}


def test_csv_with_class_name_labels(image_folder, tmp_path):
    rows = ["path,label"] + [f"{p},{p.parent.name.replace('_', ' ')}" for p in sorted(image_folder.rglob("*.png"))]
    (tmp_path / "train.csv").write_text("\n".join(rows))
    data = read_csv_splits(train=tmp_path / "train.csv")
    assert data.classnames == sorted(NAMES) and len(data.train) == 40
    (tmp_path / "bad.csv").write_text("path,label\nx.png,purple circle\n")
    with pytest.raises(ValueError, match="unknown class 'purple circle'"):
        read_csv_splits(train=tmp_path / "bad.csv", classnames=NAMES)


def test_few_shot_draw_is_seeded_saved_and_reused(dassl_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    dm = FewShotDataModule(str(dassl_folder), shots=2, seed=5, num_workers=0)
    train = dm.split_samples("train")
    assert len(train) == 8 and all(sum(s.label == c for s in train) == 2 for c in range(4))
    # Kept in the vlprompt cache, never in the user's data folder.
    assert not (dassl_folder / ".vlprompt").exists()
    [saved] = list((tmp_path / "cache" / "fewshot").glob("*/shot_2-seed_5.json"))
    assert len(json.loads(saved.read_text())["train"]["paths"]) == 8
    assert dm.split_samples("train") == train
    assert len(dm.split_samples("val")) == 8  # min(shots, 4) per class
    # With readable images the draw is exactly the seeded sample of each class.
    import random

    rng = random.Random(5)
    expected = [p for c in range(4) for p in rng.sample([s for s in dm.samples.train if s.label == c], 2)]
    assert train == expected
    other = sample_few_shot(dm.samples.train, 2, seed=6)
    assert [s.path for s in other] != [s.path for s in train]
    # The saved draw wins even if the sampler would now draw differently.
    data = json.loads(saved.read_text())
    data["train"]["paths"] = [s.path for s in other]
    saved.write_text(json.dumps(data))
    assert [s.path for s in dm.split_samples("train")] == [s.path for s in other]


def test_a_class_added_later_gets_its_own_draw(image_folder, tmp_path, monkeypatch):
    from conftest import write_image
    import numpy as np

    monkeypatch.setenv("VLPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    FewShotDataModule(str(image_folder), shots=2, num_workers=0).split_samples("train")
    rng = np.random.default_rng(3)
    for i in range(6):
        write_image(image_folder / "purple_square" / f"{i}.png", (150, 30, 150), rng)
    dm = FewShotDataModule(str(image_folder), shots=2, num_workers=0)
    train = dm.split_samples("train")
    assert dm.classnames[2] == "purple square" and sum(s.label == 2 for s in train) == 2
    assert len(list((tmp_path / "cache" / "fewshot").iterdir())) == 2  # a new draw, the old one kept


def test_a_saved_draw_for_other_data_is_refused_not_reused(image_folder, tmp_path):
    from conftest import write_image
    import numpy as np

    from vlprompt.data.fewshot import FewShotDrawMismatch

    FewShotDataModule(str(image_folder), shots=2, num_workers=0, fewshot_dir=str(tmp_path / "draws")).split_samples("train")
    write_image(image_folder / "red_square" / "new.png", (200, 30, 30), np.random.default_rng(0))
    dm = FewShotDataModule(str(image_folder), shots=2, num_workers=0, fewshot_dir=str(tmp_path / "draws"))
    before = (tmp_path / "draws" / "shot_2-seed_1.json").read_text()
    with pytest.raises(FewShotDrawMismatch, match="train images changed"):
        dm.split_samples("train")
    assert (tmp_path / "draws" / "shot_2-seed_1.json").read_text() == before  # left alone


def test_unreadable_files_are_never_drawn_as_shots(dassl_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    clean = FewShotDataModule(str(dassl_folder), shots=2, num_workers=0, fewshot_dir=str(tmp_path / "a"))
    first = clean.split_samples("train")
    for sample in first[:3]:
        Path(sample.path).write_bytes(b"broken")
    dm = FewShotDataModule(str(dassl_folder), shots=2, num_workers=0, fewshot_dir=str(tmp_path / "b"))
    train = dm.split_samples("train")
    assert len(train) == 8 and not {s.path for s in first[:3]} & {s.path for s in train}
    assert {s.path for s in first[3:]} <= {s.path for s in train}  # the readable shots stay


def test_base_novel_split_follows_the_literature():
    samples = [Sample(f"{i}.png", i, f"c{i}") for i in range(5)]
    base, base_names = subset_classes(samples, [f"c{i}" for i in range(5)], "base")
    novel, novel_names = subset_classes(samples, [f"c{i}" for i in range(5)], "novel")
    assert base_names == ["c0", "c1", "c2"] and novel_names == ["c3", "c4"]  # ceil(5/2) base
    assert [s.label for s in novel] == [0, 1]  # relabelled from 0


def test_datamodule_subset_sets_classnames(dassl_folder):
    dm = FewShotDataModule(str(dassl_folder), shots=2, subset="novel", num_workers=0)
    assert dm.classnames == NAMES[2:]
    dm.setup("test")
    assert {dm.datasets["test"].samples[i].label for i in range(len(dm.datasets["test"]))} == {0, 1}


def test_empty_and_missing_class_folders_are_clear_errors(image_folder):
    (image_folder / "purple_square").mkdir()
    with pytest.raises(ValueError, match="purple_square contains no images"):
        FewShotDataModule(str(image_folder))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        FewShotDataModule(str(image_folder / "nowhere"), format="imagefolder")


def test_expected_classnames_are_checked(dassl_folder):
    FewShotDataModule(str(dassl_folder), classnames=NAMES)
    with pytest.raises(ValueError, match="do not match the data"):
        FewShotDataModule(str(dassl_folder), classnames=["red square", "pink circle"])


def test_unreadable_images_are_skipped_and_counted(dassl_folder):
    broken = sorted((dassl_folder / "images").rglob("test_*.png"))[:3]
    for p in broken:
        p.write_bytes(b"not a png")
    dm = FewShotDataModule(str(dassl_folder), shots=-1, num_workers=0, eval_batch_size=100)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    bad = sorted(i for i, s in enumerate(dm.datasets["test"].samples) if Path(s.path) in set(broken))
    assert batch["skipped"] == bad and len(bad) == 3 and len(batch["label"]) == 21
    strict = ImageDataset(dm.datasets["test"].samples, on_error="raise")
    bad_index = [i for i, s in enumerate(strict.samples) if s.path == str(broken[0])][0]
    with pytest.raises(OSError, match="cannot read image"):
        strict[bad_index]


def test_all_unreadable_batch_collates_to_nothing():
    batch = collate_skipping([{"unreadable": 4}, {"unreadable": 7}])
    assert batch["image"] is None and batch["skipped"] == [4, 7]


def test_dassl_split_with_bad_rows_is_a_clear_error(dassl_folder):
    (dassl_folder / "split_zhou_Colours.json").write_text(json.dumps({"train": [["a.png", "x"]]}))
    with pytest.raises(ValueError, match=r"\[path, label, classname\]"):
        FewShotDataModule(str(dassl_folder))


def test_missing_split_file_is_a_clear_error(dassl_folder):
    shutil.rmtree(dassl_folder / "images")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        FewShotDataModule(str(dassl_folder))


def test_catalog_dataset_not_prepared_lists_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="Oxford-IIIT Pets is not prepared"):
        FewShotDataModule(str(tmp_path), dataset="oxford_pets")


def test_train_loader_yields_augmented_batches(dassl_folder):
    dm = FewShotDataModule(str(dassl_folder), shots=2, num_workers=0, batch_size=4)
    dm.set_preprocess({"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert dm.train_augmentation


def test_test_per_class_draws_a_seeded_subset_of_the_test_split(dassl_folder):
    from collections import Counter

    from vlprompt.data import FewShotDataModule

    def test_paths(seed):
        dm = FewShotDataModule(str(dassl_folder), shots=2, seed=seed, test_per_class=3, num_workers=0)
        dm.setup("test")
        return [s.path for s in dm.datasets["test"].samples], dm

    paths, dm = test_paths(1)
    assert Counter(s.label for s in dm.datasets["test"].samples) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert test_paths(1)[0] == paths and test_paths(2)[0] != paths
    with pytest.raises(ValueError, match="test_per_class"):
        FewShotDataModule(str(dassl_folder), test_per_class=0)


def test_class_names_are_normalised_in_every_source(tmp_path, image_folder):
    """Underscores become spaces, as in every reference implementation."""
    from vlprompt.data import read_dassl_split
    from vlprompt.prompts.base import PromptLearner

    split = {"train": [["a.png", 0, "american_bulldog"], ["b.png", 1, "great  pyrenees "]], "val": [], "test": []}
    (tmp_path / "images").mkdir()
    (tmp_path / "split.json").write_text(json.dumps(split))
    data = read_dassl_split(tmp_path / "split.json", tmp_path / "images")
    assert data.classnames == ["american bulldog", "great pyrenees"]
    assert {s.classname for s in data.train} == {"american bulldog", "great pyrenees"}
    (tmp_path / "t.csv").write_text("path,label\nx.png,golden_retriever\ny.png,pug\n")
    assert read_csv_splits(train=tmp_path / "t.csv").classnames == ["golden retriever", "pug"]
    assert "red square" in FewShotDataModule(str(image_folder), shots=-1).classnames  # red_square/
    names = PromptLearner.set_classnames.__doc__
    assert "golden retriever" in names


def test_duplicate_class_names_are_refused(image_folder, tmp_path):
    (tmp_path / "names.txt").write_text("blue_square Blue\ngreen_square blue\nred_square red\nyellow_square yellow\n")
    with pytest.raises(ValueError, match="duplicate class names"):
        FewShotDataModule(str(image_folder), classnames_file=str(tmp_path / "names.txt"))
    (tmp_path / "t.csv").write_text("path,label,classname\nx.png,0,cat\ny.png,1,Cat\n")
    with pytest.raises(ValueError, match="duplicate class names"):
        read_csv_splits(train=tmp_path / "t.csv")


def test_csv_label_unknown_to_the_train_split_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text("path,label\na.png,cat\nb.png,dog\n")
    (tmp_path / "test.csv").write_text("path,label\nc.png,cat\nd.png,horse\n")
    with pytest.raises(ValueError, match=r"test CSV, row 3: unknown class 'horse'"):
        read_csv_splits(train=tmp_path / "train.csv", test=tmp_path / "test.csv")


def test_imagefolder_on_a_dassl_folder_or_a_single_class_is_an_error(dassl_folder, image_folder):
    with pytest.raises(ValueError, match="CoOp/Dassl dataset folder"):
        FewShotDataModule(str(dassl_folder), format="imagefolder")
    single = image_folder.parent / "single"
    shutil.copytree(image_folder / "red_square", single / "red_square")
    with pytest.raises(ValueError, match="only one class folder"):
        FewShotDataModule(str(single), format="imagefolder")
    nested = image_folder.parent / "nested"
    shutil.copytree(image_folder, nested / "a" / "inner")
    shutil.copytree(image_folder, nested / "b" / "inner")
    with pytest.raises(ValueError, match="only in sub-folders"):
        FewShotDataModule(str(nested), format="imagefolder")


def test_one_classnames_file_format_for_fit_and_tta(image_folder, tmp_path):
    from vlprompt.data import TestImagesDataModule

    plain = tmp_path / "plain.txt"
    plain.write_text("# label order\nyellow square\nred square\n\ngreen square\nblue square\n")
    mapped = tmp_path / "mapped.txt"
    mapped.write_text("yellow_square gelb\nred_square rot\ngreen_square grün\nblue_square blau\n")
    for module in (FewShotDataModule, TestImagesDataModule):
        assert module(str(image_folder), classnames_file=str(plain)).classnames == [
            "yellow square", "red square", "green square", "blue square"]
        assert module(str(image_folder), classnames_file=str(mapped)).classnames == ["gelb", "rot", "grün", "blau"]
    dm = FewShotDataModule(str(image_folder), classnames_file=str(mapped), shots=-1)
    label_of = {Path(s.path).parent.name: s.label for s in dm.samples.train}
    assert label_of == {"yellow_square": 0, "red_square": 1, "green_square": 2, "blue_square": 3}
    (tmp_path / "short.txt").write_text("red square\n")
    with pytest.raises(ValueError, match="not named in"):
        FewShotDataModule(str(image_folder), classnames_file=str(tmp_path / "short.txt"))


def test_16_bit_and_transparent_images_load_as_a_viewer_shows_them(tmp_path):
    import numpy as np
    from PIL import Image

    from vlprompt.data.images import load_rgb

    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(str(tmp_path / "g16.png")))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, -1].tolist() == [255, 255, 255]
    assert len(np.unique(rgb[0, :, 0])) > 50  # a gradient, not all white
    shape = np.zeros((32, 32, 4), dtype=np.uint8)  # black RGB, the shape only in alpha
    shape[8:24, 8:24, 3] = 255
    Image.fromarray(shape, mode="RGBA").save(tmp_path / "alpha.png")
    rgb = np.asarray(load_rgb(str(tmp_path / "alpha.png")))
    assert rgb[16, 16].tolist() == [0, 0, 0] and rgb[0, 0].tolist() == [255, 255, 255]


def test_datasets_are_identified_by_their_samples_and_preprocessing(dassl_folder, tmp_path):
    from vlprompt.data import ClassificationData, TestImagesDataModule

    dm = FewShotDataModule(str(dassl_folder), shots=-1, num_workers=0)
    dm.setup("test")
    again = FewShotDataModule(str(dassl_folder), shots=-1, num_workers=0)
    again.setup("test")
    assert dm.dataset("test").fingerprint == again.dataset("test").fingerprint
    shutil.copytree(dassl_folder, tmp_path / "copy")
    other = FewShotDataModule(str(tmp_path / "copy"), shots=-1, num_workers=0)
    other.setup("test")
    assert other.classnames == dm.classnames and other.dataset("test").fingerprint != dm.dataset("test").fingerprint
    before = dm.dataset("test").fingerprint
    dm.set_preprocess({"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert dm.dataset("test").fingerprint != before and dm.dataset("predict") is dm.dataset("test")
    assert isinstance(dm, ClassificationData) and isinstance(TestImagesDataModule(str(dassl_folder / "images")), ClassificationData)


def test_distributed_evaluation_sampler_splits_without_padding():
    from vlprompt.data.images import EvalDistributedSampler

    data = list(range(15))
    parts = [list(EvalDistributedSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == data and [len(p) for p in parts] == [8, 7]
    assert len(EvalDistributedSampler(data, num_replicas=2, rank=1)) == 7
