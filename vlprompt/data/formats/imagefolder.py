"""ImageFolder trees: ``root/<class>/*.jpg`` or ``root/{train,val,test}/<class>/*``; and the
benchmark folders of the ImageNet family described in ``datasets/`` (class folders named by
wnid or index, class names from ``classnames.txt``)."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlprompt.data.classnames import check_distinct_classnames, normalize_classname, read_classnames_file
from vlprompt.data.files import IMAGE_EXTENSIONS, list_images
from vlprompt.data.formats.registry import ClassificationSource, register_format
from vlprompt.data.samples import Sample, SplitSamples

__all__ = ["folder_classnames", "read_benchmark_folders", "read_imagefolder"]

log = logging.getLogger(__name__)


def _class_folder_names(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _refuse_non_imagefolder(root: Path, folders: list[str]) -> None:
    """A CoOp/Dassl folder or a single class folder read as an ImageFolder tree is a clear error."""
    splits = sorted(root.glob("split_*.json"))
    if splits or folders == ["images"]:
        found = f" ({splits[0].name})" if splits else ""
        raise ValueError(
            f"{root} looks like a CoOp/Dassl dataset folder{found}, not an ImageFolder tree: read as one it "
            "would be a single class 'images'. Use format: dassl (or auto), or point root at the folder "
            "holding one sub-folder per class"
        )
    if len(folders) < 2:
        raise ValueError(
            f"{root}: only one class folder ({folders[0]!r}); a classifier needs at least 2. Expected "
            f"{root}/<class name>/<images>"
        )


def _class_folder_images(root: Path, folder: str) -> list[Path]:
    path = root / folder
    if not path.is_dir():
        raise FileNotFoundError(f"class folder missing: {path}")
    images = list_images(path)
    if not images:
        raise ValueError(f"class folder {path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    if all(p.parent != path for p in images):
        raise ValueError(
            f"class folder {path} holds its images only in sub-folders ({images[0].parent}); expected "
            f"{root}/<class name>/<images>. Point root at the folder whose sub-folders are the classes"
        )
    return images


def _read_class_folders(root: Path, classes: list[str] | None) -> tuple[list[str], dict[str, list[Path]]]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = classes or _class_folder_names(root)
    if not folders:
        raise ValueError(f"{root}: no class folders found (expected {root}/<class name>/<images>)")
    if classes is None:
        _refuse_non_imagefolder(root, folders)
    return folders, {folder: _class_folder_images(root, folder) for folder in folders}


def folder_classnames(folders: Sequence[str], classnames_file: str | Path | None, where: str) -> tuple[list[str], list[str]]:
    """The class folders in label order and their class names: sorted folder names (underscores
    read as spaces), or as a class-names file says (:func:`~vlprompt.data.classnames.read_classnames_file`:
    ``<folder> <name>`` lines or plain names matching the folders by normalised name; the file's
    order is the label order)."""
    if classnames_file is None:
        names = [normalize_classname(f) for f in folders]
    else:
        entries = read_classnames_file(classnames_file, folders)
        mapped = {folder: name for folder, name in entries if folder is not None}
        by_name = {name.lower(): name for folder, name in entries if folder is None}
        names, missing = [], []
        for folder in folders:
            name = mapped.get(folder) or by_name.get(normalize_classname(folder).lower())
            if name is None:
                missing.append(folder)
            names.append(name)
        if missing:
            raise ValueError(f"{where}: class folders {missing[:10]} are not named in {classnames_file}")
        order = {name: i for i, (_, name) in enumerate(entries)}
        folders, names = map(list, zip(*sorted(zip(folders, names), key=lambda fn: order[fn[1]])))
    check_distinct_classnames(names, where)
    return list(folders), names


def _read_presplit(root: Path, presplit: list[str], classnames_file: str | Path | None, out: SplitSamples) -> list[str]:
    folders, _ = _read_class_folders(root / presplit[0], None)
    folders, names = folder_classnames(folders, classnames_file, str(root))
    for split in presplit:
        _, images = _read_class_folders(root / split, folders)
        setattr(out, split, [Sample(str(p), label, names[label]) for label, f in enumerate(folders) for p in images[f]])
    return names


def _read_and_split(root: Path, classnames_file: str | Path | None, split_ratios: tuple[float, float], seed: int,
                    out: SplitSamples) -> list[str]:
    folders, images = _read_class_folders(root, None)
    folders, names = folder_classnames(folders, classnames_file, str(root))
    rng = random.Random(seed)
    for label, folder in enumerate(folders):
        paths = list(images[folder])
        rng.shuffle(paths)
        n_train = max(1, round(len(paths) * split_ratios[0]))
        n_val = round(len(paths) * split_ratios[1])
        name = names[label]
        out.train += [Sample(str(p), label, name) for p in paths[:n_train]]
        out.val += [Sample(str(p), label, name) for p in paths[n_train : n_train + n_val]]
        out.test += [Sample(str(p), label, name) for p in paths[n_train + n_val :]]
        if len(paths) - n_train - n_val < 1:
            log.warning("class %r has %d images: none left for testing", name, len(paths))
    return names


def read_imagefolder(
    root: str | Path,
    *,
    classnames_file: str | Path | None = None,
    split_ratios: tuple[float, float] = (0.5, 0.2),
    seed: int = 1,
) -> SplitSamples:
    """Read ``root/<class>/*`` (split per class into train/val/test by ``split_ratios``, the rest
    is test) or ``root/{train,val,test}/<class>/*`` when those folders exist. Folder names become
    class names (underscores to spaces) unless ``classnames_file`` names them (see
    :func:`folder_classnames`). A CoOp/Dassl folder, a single class folder or images nested one
    level too deep are clear errors."""
    root = Path(root)
    out = SplitSamples()
    presplit = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if presplit:
        out.classnames = _read_presplit(root, presplit, classnames_file, out)
    else:
        out.classnames = _read_and_split(root, classnames_file, split_ratios, seed, out)
    return out


# -- benchmark folders described in datasets/ ----------------------------------------------------
def _benchmark_classes(desc: Any, classnames_file: Path) -> tuple[list[str], dict[str, str]]:
    """Folder names in ``classnames.txt`` order and the class name of each folder (folders named
    by wnid, or by class index for ImageNetV2)."""
    lines = [ln.strip() for ln in classnames_file.read_text().splitlines() if ln.strip()]
    if desc.folder_names == "index":
        folders = [str(i) for i in range(len(lines))]
    else:
        folders = [ln.partition(" ")[0] for ln in lines]
    return folders, {folder: normalize_classname(ln.partition(" ")[2]) for folder, ln in zip(folders, lines)}


def read_benchmark_folders(desc: Any, root: str | Path) -> SplitSamples:
    """Read a prepared ``imagefolder`` benchmark of ``datasets/`` (``desc``: its descriptor).

    Folder names (wnids, or class indices for ImageNetV2) map to class names through
    ``classnames_file``; sets that cover a subset of ImageNet's classes (ImageNet-A/-R) keep the
    classes whose folders are present, in ``classnames_file`` order. Test-only sets have empty
    train/val splits.
    """
    paths = desc.paths(root)
    folders, names_by_folder = _benchmark_classes(desc, paths["classnames_file"])
    split_dirs = {"train": paths.get("train_dir"), "test": paths.get("test_dir")}
    present = folders
    if desc.class_subset == "from_folders":
        base = split_dirs["test"] or split_dirs["train"]
        present = [f for f in folders if (base / f).is_dir()]
    out = SplitSamples(classnames=[names_by_folder[f] for f in present])
    for split, directory in split_dirs.items():
        if directory is not None:
            setattr(out, split, [Sample(str(p), label, names_by_folder[folder]) for label, folder in enumerate(present)
                                 for p in list_images(directory / folder, recursive=False)])
    log.info("%s: read %d train and %d test images", desc.display_name, len(out.train), len(out.test))
    return out


def _check_descriptor(fields: dict[str, Any], name: str) -> tuple[str, str] | None:
    for key in ("test_dir", "folder_names"):
        if fields[key] is None:
            return key, f"required for format {name!r}"
    return None


@register_format("imagefolder", task="classification", detect=lambda source: True,
                 read_descriptor=read_benchmark_folders, check_descriptor=_check_descriptor,
                 descriptor_keys=("train_dir", "test_dir", "folder_names", "class_subset"))
def read_imagefolder_source(source: ClassificationSource) -> SplitSamples:
    """An ImageFolder tree at ``root`` (see :func:`read_imagefolder`)."""
    return read_imagefolder(source.root, classnames_file=source.classnames_file, seed=source.seed)
