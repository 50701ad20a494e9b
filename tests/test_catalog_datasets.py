"""Standard datasets read through their descriptors (ImageNet-style folders, FGVC variants)."""

from __future__ import annotations

import numpy as np

from conftest import write_image
from vlprompt.data import FewShotDataModule

RNG = np.random.default_rng(0)
WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def _classnames_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in WNIDS.items()))


def test_imagenet_layout(tmp_path):
    root = tmp_path / "imagenet"
    _classnames_file(root / "classnames.txt")
    for split in ("train", "val"):
        for wnid in WNIDS:
            for i in range(3):
                write_image(root / "images" / split / wnid / f"{i}.JPEG", (100, 100, 100), RNG, size=8)
    dm = FewShotDataModule(str(tmp_path), dataset="imagenet", shots=2, num_workers=0)
    assert dm.classnames == list(WNIDS.values())
    assert dm.template == "a photo of a {}."
    assert len(dm.split_samples("train")) == 6 and len(dm.split_samples("test")) == 9


def test_imagenet_a_keeps_the_classes_whose_folders_exist(tmp_path):
    root = tmp_path / "imagenet-adversarial"
    _classnames_file(root / "classnames.txt")
    for wnid in ("n01443537", "n01484850"):  # a 2-class subset
        write_image(root / "imagenet-a" / wnid / "0.jpg", (10, 10, 10), RNG, size=8)
    dm = FewShotDataModule(str(tmp_path), dataset="imagenet_a", shots=-1, num_workers=0)
    assert dm.classnames == ["goldfish", "great white shark"]
    assert [s.label for s in dm.split_samples("test")] == [0, 1]


def test_imagenet_v2_index_folders(tmp_path):
    root = tmp_path / "imagenetv2"
    _classnames_file(root / "classnames.txt")
    for index in range(3):
        write_image(root / "imagenetv2-matched-frequency-format-val" / str(index) / "a.jpeg", (0, 0, 0), RNG, size=8)
    dm = FewShotDataModule(str(tmp_path), dataset="imagenet_v2", shots=-1, num_workers=0)
    samples = dm.split_samples("test")
    assert [(s.label, s.classname) for s in samples] == [(0, "tench"), (1, "goldfish"), (2, "great white shark")]


def test_fgvc_aircraft_variant_lists(tmp_path):
    root = tmp_path / "fgvc_aircraft"
    (root / "images").mkdir(parents=True)
    (root / "variants.txt").write_text("707-320\nA300B4\n")
    for split, ids in (("train", ["1", "2"]), ("val", ["3", "4"]), ("test", ["5", "6"])):
        (root / f"images_variant_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in zip(ids, ["707-320", "A300B4"])))
        for i in ids:
            write_image(root / "images" / f"{i}.jpg", (50, 50, 50), RNG, size=8)
    dm = FewShotDataModule(str(tmp_path), dataset="fgvc_aircraft", shots=1, num_workers=0)
    assert dm.classnames == ["707-320", "A300B4"]
    assert [s.label for s in dm.split_samples("train")] == [0, 1]
