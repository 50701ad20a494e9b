"""Dataset formats, few-shot sampling, base/novel subsets and bad input."""

from __future__ import annotations

import json
import shutil

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
    with pytest.raises(ValueError, match="unknown class name 'purple circle'"):
        read_csv_splits(train=tmp_path / "bad.csv", classnames=NAMES)


def test_few_shot_draw_is_seeded_saved_and_reused(dassl_folder):
    dm = FewShotDataModule(str(dassl_folder), shots=2, seed=5, num_workers=0)
    train = dm.split_samples("train")
    assert len(train) == 8 and all(sum(s.label == c for s in train) == 2 for c in range(4))
    saved = dassl_folder / ".vlprompt" / "fewshot" / "shot_2-seed_5.json"
    assert saved.is_file() and len(json.loads(saved.read_text())["train"]) == 8
    assert dm.split_samples("train") == train
    assert len(dm.split_samples("val")) == 8  # min(shots, 4) per class
    other = sample_few_shot(dm.samples.train, 2, seed=6)
    assert [s.path for s in other] != [s.path for s in train]
    # The saved draw wins even if the sampler would now draw differently.
    data = json.loads(saved.read_text())
    data["train"] = [s.path for s in other]
    saved.write_text(json.dumps(data))
    assert [s.path for s in dm.split_samples("train")] == [s.path for s in other]


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
    assert batch["skipped"] == 3 and len(batch["label"]) == 21
    strict = ImageDataset(dm.datasets["test"].samples, on_error="raise")
    bad_index = [i for i, s in enumerate(strict.samples) if s.path == str(broken[0])][0]
    with pytest.raises(OSError, match="cannot read image"):
        strict[bad_index]


def test_all_unreadable_batch_collates_to_nothing():
    batch = collate_skipping([None, None])
    assert batch["image"] is None and batch["skipped"] == 2


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
