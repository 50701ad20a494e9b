"""The data-format registry, the one image-listing function and the light ``vlprompt.data``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vlprompt.data import FewShotDataModule, ImageTextPairs, SegmentationDataModule
from vlprompt.data.catalog import FORMATS, descriptor_dir, load_descriptor
from vlprompt.data.files import IMAGE_EXTENSIONS, find_image, list_images
from vlprompt.data.formats import (
    ClassificationSource,
    format_names,
    get_format,
    register_format,
    unregister_format,
)
from vlprompt.data.samples import Sample, SplitSamples


# -- the registry ------------------------------------------------------------------------------------
def test_every_task_has_its_formats() -> None:
    assert format_names("classification") == ["csv", "dassl", "imagefolder", "fgvc_variants"]
    assert format_names("segmentation") == ["tunevlseg", "voc"]
    assert format_names("pairs") == ["caption_folder", "webdataset", "caption_table"]
    assert "dassl_split" in format_names("classification", aliases=True)
    assert set(FORMATS) == {"dassl", "dassl_split", "imagefolder", "fgvc_variants"}


@pytest.mark.parametrize("name", format_names(aliases=True))
def test_every_registered_format_is_found_by_its_names(name: str) -> None:
    fmt = get_format(name)
    assert name in fmt.names
    assert fmt.read is not None or fmt.read_descriptor is not None
    assert get_format(name, fmt.task) is fmt


def test_the_old_name_dassl_split_is_dassl(dassl_folder: Path) -> None:
    assert get_format("dassl_split") is get_format("dassl")
    old = FewShotDataModule(str(dassl_folder), format="dassl_split", shots=-1, num_workers=0)
    new = FewShotDataModule(str(dassl_folder), format="dassl", shots=-1, num_workers=0)
    assert old.samples == new.samples and old.classnames == new.classnames


def test_a_descriptor_may_name_either_dassl_name(tmp_path: Path) -> None:
    data = yaml.safe_load((descriptor_dir() / "oxford_pets.yaml").read_text(encoding="utf-8"))
    assert data["format"] == "dassl_split"
    data["format"] = "dassl"
    (tmp_path / "oxford_pets.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    assert load_descriptor("oxford_pets", tmp_path).split_file == "split_zhou_OxfordPets.json"
    data.pop("split_file")
    (tmp_path / "oxford_pets.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ValueError, match="'split_file'"):
        load_descriptor("oxford_pets", tmp_path)


def test_unknown_formats_are_refused_naming_the_known_ones(dassl_folder: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown format 'tarball'; use auto, csv, dassl, imagefolder or fgvc_variants"):
        FewShotDataModule(str(dassl_folder), format="tarball")
    with pytest.raises(ValueError, match=r"unknown format 'tarball'; use tunevlseg or voc"):
        SegmentationDataModule(str(dassl_folder), format="tarball")
    with pytest.raises(ValueError, match="unknown format 'voc'"):
        get_format("voc", "classification")
    with pytest.raises(ValueError, match="expected a folder, a .csv/.tsv file or .tar shards"):
        ImageTextPairs(dassl_folder / "nowhere.bin")


def test_a_new_format_is_a_reader_and_one_registration(tmp_path: Path) -> None:
    """What a user adds: one decorated reader; FewShotDataModule then reads it by name."""
    images = []
    for i, colour in enumerate(["red", "blue"] * 3):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), colour).save(images[-1])

    def read_listing(source: ClassificationSource) -> SplitSamples:
        names = ["red", "blue"]
        samples = [Sample(str(p), i % 2, names[i % 2]) for i, p in enumerate(images)]
        return SplitSamples(train=samples[:4], val=samples[4:], test=samples[4:], classnames=names)

    register_format("test_listing", task="classification", aliases=("test_listing_v0",))(read_listing)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_format("test_listing", task="classification")(read_listing)
        dm = FewShotDataModule(str(tmp_path), format="test_listing_v0", shots=2, num_workers=0)
        assert dm.classnames == ["red", "blue"] and len(dm.split_samples("train")) == 4
    finally:
        unregister_format("test_listing")
    assert "test_listing" not in format_names(aliases=True)


def test_auto_detection_order(dassl_folder: Path, image_folder: Path) -> None:
    assert FewShotDataModule(str(dassl_folder), shots=-1, num_workers=0).samples == \
        FewShotDataModule(str(dassl_folder), format="dassl", shots=-1, num_workers=0).samples
    assert FewShotDataModule(str(image_folder), shots=-1, num_workers=0).samples == \
        FewShotDataModule(str(image_folder), format="imagefolder", shots=-1, num_workers=0).samples


# -- one image listing -------------------------------------------------------------------------------
def test_one_extension_list_is_the_union_of_the_old_ones() -> None:
    old_pairs = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
    old_folders = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
    assert set(IMAGE_EXTENSIONS) == set(old_pairs) | set(old_folders)


def test_list_images(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "folder.jpg").mkdir()  # a folder, whatever its name
    for name in ("b.PNG", "a.jpg", "notes.txt", "sub/c.tiff", "sub/d.gif"):
        (tmp_path / name).write_bytes(b"x")
    assert list_images(tmp_path, recursive=False) == [tmp_path / "a.jpg", tmp_path / "b.PNG"]
    assert list_images(tmp_path) == [tmp_path / "a.jpg", tmp_path / "b.PNG", tmp_path / "sub/c.tiff",
                                     tmp_path / "sub/d.gif"]
    assert list_images(tmp_path / "missing") == []
    assert find_image(tmp_path / "sub", "c") == tmp_path / "sub/c.tiff"
    assert find_image(tmp_path / "sub", "e") == tmp_path / "sub/e.jpg"  # reported as missing


def test_caption_folders_read_every_listed_extension(tmp_path: Path) -> None:
    for i, ext in enumerate((".png", ".gif")):
        Image.fromarray(np.full((8, 8, 3), 100 * i, np.uint8)).save(tmp_path / f"{i}{ext}")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}\n")
    pairs = ImageTextPairs(tmp_path)
    assert pairs.format == "caption_folder"
    assert [p.caption for p in pairs] == ["caption 0", "caption 1"]


# -- light package -----------------------------------------------------------------------------------
def test_importing_vlprompt_data_and_the_world_stays_light() -> None:
    code = ("import sys; import vlprompt.data; from vlprompt.data import world; import vlprompt.data.catalog; "
            "world.render; print(json.dumps(sorted(m for m in ('torch', 'lightning') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
