"""Fast tests for the dataset descriptor catalog (vlprompt.data.catalog)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vlprompt.data.catalog import (
    CLASSNAMES_SOURCES,
    FORMATS,
    ROLES,
    DatasetDescriptor,
    check_prepared,
    descriptor_dir,
    list_datasets,
    load_all,
    load_descriptor,
)

EXPECTED_CLASSES = {
    "imagenet": 1000,
    "caltech101": 100,
    "oxford_pets": 37,
    "stanford_cars": 196,
    "oxford_flowers": 102,
    "food101": 101,
    "fgvc_aircraft": 100,
    "sun397": 397,
    "dtd": 47,
    "eurosat": 10,
    "ucf101": 101,
    "imagenet_v2": 1000,
    "imagenet_sketch": 1000,
    "imagenet_a": 200,
    "imagenet_r": 200,
}
DOMAIN_SHIFT = {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
ALL = sorted(EXPECTED_CLASSES)
#: ELEVATER's image-classification tasks (MVLPT's multitask benchmark), prepared by hand.
ELEVATER_METRICS = {
    "caltech_101": "mean_per_class", "cifar_10": "accuracy", "cifar_100": "accuracy", "country211": "accuracy",
    "dtd": "accuracy", "eurosat": "accuracy", "fer_2013": "accuracy", "fgvc_aircraft": "mean_per_class",
    "food_101": "accuracy", "gtsrb": "accuracy", "kitti_distance": "accuracy", "mnist": "accuracy",
    "oxford_flower_102": "mean_per_class", "oxford_iiit_pets": "mean_per_class", "patch_camelyon": "accuracy",
    "rendered_sst2": "accuracy", "resisc45": "accuracy", "stanford_cars": "accuracy",
}
ELEVATER = sorted(f"elevater_{name}" for name in ELEVATER_METRICS)


def test_descriptor_dir_is_repo_datasets_folder() -> None:
    d = descriptor_dir()
    assert d.is_dir()
    assert (d / "oxford_pets.yaml").is_file()


def test_list_datasets_is_exactly_the_benchmark_set() -> None:
    assert list_datasets() == sorted(ALL + ELEVATER)


@pytest.mark.parametrize("name", ELEVATER)
def test_elevater_descriptors_declare_metric_and_class_names(name: str) -> None:
    desc = load_descriptor(name)
    assert desc.metric == ELEVATER_METRICS[name.removeprefix("elevater_")]
    assert desc.classnames is not None and len(desc.classnames) == desc.num_classes == len(set(desc.classnames))


@pytest.mark.parametrize("name", ALL)
def test_descriptor_loads_and_is_consistent(name: str) -> None:
    desc = load_descriptor(name)
    assert isinstance(desc, DatasetDescriptor)
    assert desc.source_path is not None and desc.source_path.stem == name
    assert desc.name == name
    assert desc.num_classes == EXPECTED_CLASSES[name]
    assert desc.format in FORMATS
    assert desc.classnames_from in CLASSNAMES_SOURCES
    assert desc.role in ROLES
    assert desc.role == ("domain_shift_target" if name in DOMAIN_SHIFT else "fewshot")
    assert desc.template.count("{}") == 1
    assert desc.format_prompt("X").count("X") == 1
    assert "images" in desc.sources and desc.sources["images"].strip()
    assert desc.layout.strip() and desc.prepare.strip()
    assert desc.layout.splitlines()[0].split("#")[0].strip().rstrip("/") == desc.folder
    if desc.format == "dassl_split":
        assert desc.split_file is not None and desc.split_file.startswith("split_zhou_")
        assert desc.split_file in desc.layout
        assert "split" in desc.sources
    if desc.format == "imagefolder":
        assert desc.test_dir is not None and desc.folder_names in {"wnid", "index"}
        assert desc.classnames_file == "classnames.txt"


def test_specific_facts() -> None:
    pets = load_descriptor("oxford_pets")
    assert pets.template == "a photo of a {}, a type of pet."
    assert pets.split_file == "split_zhou_OxfordPets.json"
    assert load_descriptor("dtd").split_file == "split_zhou_DescribableTextures.json"
    assert load_descriptor("dtd").template == "{} texture."
    assert load_descriptor("eurosat").template == "a centered satellite photo of {}."
    assert load_descriptor("food101").folder == "food-101"
    assert load_descriptor("caltech101").folder == "caltech-101"

    air = load_descriptor("fgvc_aircraft")
    assert air.format == "fgvc_variants" and air.split_file is None
    assert air.variant_files == {
        "train": "images_variant_train.txt",
        "val": "images_variant_val.txt",
        "test": "images_variant_test.txt",
    }
    assert air.classnames_file == "variants.txt"

    inet = load_descriptor("imagenet")
    assert (inet.image_dir, inet.train_dir, inet.test_dir) == ("images", "train", "val")
    v2 = load_descriptor("imagenet_v2")
    assert v2.folder_names == "index"
    assert v2.image_dir == "imagenetv2-matched-frequency-format-val"
    assert load_descriptor("imagenet_a").class_subset == "from_folders"
    assert load_descriptor("imagenet_r").class_subset == "from_folders"
    assert load_descriptor("imagenet_sketch").class_subset is None


@pytest.mark.parametrize(
    "query, expected",
    [
        ("OXFORD_PETS", "oxford_pets"),
        ("oxford-pets", "oxford_pets"),
        ("Imagenet-Sketch", "imagenet_sketch"),
        ("imagenetv2", "imagenet_v2"),
        (" fgvc-aircraft ", "fgvc_aircraft"),
    ],
)
def test_name_lookup_is_lenient(query: str, expected: str) -> None:
    assert load_descriptor(query).name == expected


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(KeyError) as info:
        load_descriptor("cifar10")
    msg = str(info.value)
    assert "cifar10" in msg
    for name in ALL:
        assert name in msg


def test_load_all() -> None:
    all_desc = load_all()
    assert sorted(all_desc) == sorted(ALL + ELEVATER)
    assert {d.name for d in all_desc.values()} == set(ALL + ELEVATER)


def test_descriptor_is_frozen_and_hashable() -> None:
    desc = load_descriptor("dtd")
    with pytest.raises(AttributeError):
        desc.num_classes = 3  # type: ignore[misc]
    assert hash(desc) == hash(load_descriptor("dtd"))
    assert desc == load_descriptor("dtd")


# --------------------------------------------------------------------------- broken YAMLs


def _pets_yaml() -> dict[str, Any]:
    return yaml.safe_load((descriptor_dir() / "oxford_pets.yaml").read_text(encoding="utf-8"))


def _write(tmp_path: Path, stem: str, data: dict[str, Any] | str) -> Path:
    path = tmp_path / f"{stem}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_copied_descriptor_loads_from_custom_dir(tmp_path: Path) -> None:
    _write(tmp_path, "oxford_pets", _pets_yaml())
    assert list_datasets(tmp_path) == ["oxford_pets"]
    assert load_descriptor("oxford_pets", tmp_path).num_classes == 37
    with pytest.raises(KeyError, match="oxford_pets"):
        load_descriptor("dtd", tmp_path)


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda d: d.pop("template"), "template"),
        (lambda d: d.pop("num_classes"), "num_classes"),
        (lambda d: d.pop("sources"), "sources"),
        (lambda d: d.update(format="tarball"), "format"),
        (lambda d: d.update(role="pretraining"), "role"),
        (lambda d: d.update(classnames_from="wikipedia"), "classnames_from"),
        (lambda d: d.update(name="pets"), "name"),
        (lambda d: d.update(num_classes="37"), "num_classes"),
        (lambda d: d.update(template="a photo of a pet."), "template"),
        (lambda d: d.update(template="a {} of a {}."), "template"),
        (lambda d: d.pop("split_file"), "split_file"),
        (lambda d: d.update(test_dir="val"), "test_dir"),
        (lambda d: d.update(sources={"split": "somewhere"}), "sources"),
    ],
)
def test_broken_yaml_raises_value_error_naming_file_and_key(tmp_path: Path, mutate: Any, key: str) -> None:
    data = _pets_yaml()
    mutate(data)
    path = _write(tmp_path, "oxford_pets", data)
    with pytest.raises(ValueError) as info:
        load_descriptor("oxford_pets", tmp_path)
    msg = str(info.value)
    assert str(path) in msg
    assert repr(key) in msg


def test_imagefolder_requires_test_dir(tmp_path: Path) -> None:
    data = yaml.safe_load((descriptor_dir() / "imagenet_a.yaml").read_text(encoding="utf-8"))
    del data["test_dir"]
    _write(tmp_path, "imagenet_a", data)
    with pytest.raises(ValueError, match="'test_dir'"):
        load_descriptor("imagenet_a", tmp_path)


def test_invalid_yaml_syntax_and_non_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad", "name: [unclosed\n")
    with pytest.raises(ValueError, match=str(path)):
        load_descriptor("bad", tmp_path)
    path = _write(tmp_path, "listy", "- a\n- b\n")
    with pytest.raises(ValueError, match=str(path)):
        load_descriptor("listy", tmp_path)


# --------------------------------------------------------------------------- paths / check_prepared


def test_paths_resolution(tmp_path: Path) -> None:
    p = load_descriptor("oxford_pets").paths(tmp_path)
    assert set(p) == {"folder", "image_dir", "split_file"}
    assert p["folder"] == tmp_path / "oxford_pets"
    assert p["image_dir"] == tmp_path / "oxford_pets" / "images"
    assert p["split_file"] == tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"

    p = load_descriptor("imagenet").paths(str(tmp_path))
    assert set(p) == {"folder", "image_dir", "classnames_file", "train_dir", "test_dir"}
    assert p["train_dir"] == tmp_path / "imagenet" / "images" / "train"
    assert p["test_dir"] == tmp_path / "imagenet" / "images" / "val"
    assert p["classnames_file"] == tmp_path / "imagenet" / "classnames.txt"

    cars = load_descriptor("stanford_cars").paths(tmp_path)
    assert cars["image_dir"] == cars["folder"] == tmp_path / "stanford_cars"
    v2 = load_descriptor("imagenet_v2").paths(tmp_path)
    assert v2["test_dir"] == v2["image_dir"]


@pytest.mark.parametrize("name", ALL)
def test_check_prepared_empty_root_reports_problems(tmp_path: Path, name: str) -> None:
    desc = load_descriptor(name)
    problems = check_prepared(desc, tmp_path)
    assert problems
    assert any("dataset folder not found" in p for p in problems)
    if desc.split_file is not None:
        split_path = str(desc.paths(tmp_path)["split_file"])
        assert any("split file" in p and split_path in p for p in problems)


def _lay_out(desc: DatasetDescriptor, root: Path) -> None:
    """Create the folders and (empty) files that check_prepared looks for."""
    for key, path in desc.paths(root).items():
        if key in {"folder", "image_dir", "train_dir", "test_dir"}:
            path.mkdir(parents=True, exist_ok=True)
    for key, path in desc.paths(root).items():
        if key in {"split_file", "classnames_file"} or key.startswith("variant_"):
            path.touch()


@pytest.mark.parametrize("name", ALL)
def test_check_prepared_laid_out_root_is_clean(tmp_path: Path, name: str) -> None:
    desc = load_descriptor(name)
    _lay_out(desc, tmp_path)
    assert check_prepared(desc, tmp_path) == []


def test_check_prepared_reports_just_the_missing_split_file(tmp_path: Path) -> None:
    desc = load_descriptor("oxford_pets")
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    problems = check_prepared(desc, tmp_path)
    assert len(problems) == 1 and "split file" in problems[0]


def test_check_prepared_fgvc_missing_variant_list(tmp_path: Path) -> None:
    desc = load_descriptor("fgvc_aircraft")
    _lay_out(desc, tmp_path)
    (tmp_path / "fgvc_aircraft" / "images_variant_val.txt").unlink()
    problems = check_prepared(desc, tmp_path)
    assert len(problems) == 1 and "val variant list" in problems[0]


def test_check_prepared_all_at_once(tmp_path: Path) -> None:
    for desc in load_all().values():
        _lay_out(desc, tmp_path)
    assert all(check_prepared(d, tmp_path) == [] for d in load_all().values())
