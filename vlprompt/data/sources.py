"""Readers for the dataset formats people already have on disk.

Each reader returns a :class:`SplitSamples` (train/val/test lists of :class:`Sample`) and the
class names, ordered by label:

- CoOp/Dassl split files (``split_zhou_<Dataset>.json``: lists of ``[relative path, label,
  classname]``), so prepared benchmark folders are reused as they are;
- an ImageFolder tree (``root/<class>/*.jpg``, or ``root/{train,val,test}/<class>/*``);
- CSV files with ``path,label`` rows (optionally a ``classname`` column).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "SplitSamples",
    "read_csv_splits",
    "read_dassl_split",
    "read_imagefolder",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: str
    label: int
    classname: str


@dataclass
class SplitSamples:
    """Samples of a dataset by split, with the class names ordered by label."""

    train: list[Sample] = field(default_factory=list)
    val: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r} (train, val, test)")
        return getattr(self, name)


def _classnames_from_samples(samples: Sequence[Sample], where: str) -> list[str]:
    names: dict[int, str] = {}
    for s in samples:
        if names.setdefault(s.label, s.classname) != s.classname:
            raise ValueError(f"{where}: label {s.label} is named both {names[s.label]!r} and {s.classname!r}")
    if not names:
        raise ValueError(f"{where}: no samples")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise ValueError(f"{where}: labels must be 0..{max(names)}, but {missing[:10]} have no samples")
    return [names[i] for i in range(len(names))]


def read_dassl_split(split_file: str | Path, image_dir: str | Path) -> SplitSamples:
    """Read a CoOp/Dassl ``split_zhou_*.json`` file; paths are relative to ``image_dir``."""
    split_file, image_dir = Path(split_file), Path(image_dir)
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    raw = json.loads(split_file.read_text())
    out = SplitSamples()
    for split in ("train", "val", "test"):
        rows = raw.get(split, [])
        try:
            samples = [Sample(str(image_dir / path), int(label), str(name)) for path, label, name in rows]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{split_file}: '{split}' rows must be [path, label, classname] ({err})") from err
        setattr(out, split, samples)
    out.classnames = _classnames_from_samples(out.train + out.val + out.test, str(split_file))
    return out


def _read_class_map(classnames_file: str | Path | None) -> dict[str, str]:
    """``<folder> <class name>`` lines (e.g. CoOp's ImageNet ``classnames.txt``)."""
    if classnames_file is None:
        return {}
    mapping = {}
    for line in Path(classnames_file).read_text().splitlines():
        if line.strip():
            folder, _, name = line.strip().partition(" ")
            mapping[folder] = name.strip() or folder
    return mapping


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _read_class_folders(root: Path, class_map: dict[str, str], classes: list[str] | None) -> tuple[list[str], dict[str, list[Path]]]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = classes or sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class folders found (expected {root}/<class name>/<images>)")
    images = {}
    for folder in folders:
        path = root / folder
        if not path.is_dir():
            raise FileNotFoundError(f"class folder missing: {path}")
        images[folder] = _list_images(path)
        if not images[folder]:
            raise ValueError(f"class folder {path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return folders, images


def _folder_to_name(folder: str, class_map: dict[str, str]) -> str:
    return class_map.get(folder, folder.replace("_", " "))


def read_imagefolder(
    root: str | Path,
    *,
    classnames_file: str | Path | None = None,
    split_ratios: tuple[float, float] = (0.5, 0.2),
    seed: int = 1,
) -> SplitSamples:
    """Read ``root/<class>/*`` (split per class into train/val/test by ``split_ratios``, the rest
    is test) or ``root/{train,val,test}/<class>/*`` when those folders exist. Folder names become
    class names (underscores to spaces) unless ``classnames_file`` maps them."""
    root = Path(root)
    class_map = _read_class_map(classnames_file)
    out = SplitSamples()
    presplit = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if presplit:
        folders, _ = _read_class_folders(root / presplit[0], class_map, None)
        for split in presplit:
            _, images = _read_class_folders(root / split, class_map, folders)
            setattr(out, split, [
                Sample(str(p), label, _folder_to_name(f, class_map))
                for label, f in enumerate(folders) for p in images[f]
            ])
    else:
        folders, images = _read_class_folders(root, class_map, None)
        rng = random.Random(seed)
        for label, folder in enumerate(folders):
            paths = list(images[folder])
            rng.shuffle(paths)
            n_train = max(1, round(len(paths) * split_ratios[0]))
            n_val = round(len(paths) * split_ratios[1])
            name = _folder_to_name(folder, class_map)
            out.train += [Sample(str(p), label, name) for p in paths[:n_train]]
            out.val += [Sample(str(p), label, name) for p in paths[n_train : n_train + n_val]]
            out.test += [Sample(str(p), label, name) for p in paths[n_train + n_val :]]
    out.classnames = [_folder_to_name(f, class_map) for f in folders]
    return out


def read_csv_splits(
    train: str | Path | None = None,
    val: str | Path | None = None,
    test: str | Path | None = None,
    *,
    classnames: Sequence[str] | None = None,
) -> SplitSamples:
    """Read CSV files with a header containing ``path`` and ``label`` (and optionally
    ``classname``). Relative paths are relative to the CSV file. Labels are integers, or class
    names when ``classnames`` is given or no integer labels are used."""
    out = SplitSamples()
    rows_by_split: dict[str, list[dict[str, str]]] = {}
    for split, file in (("train", train), ("val", val), ("test", test)):
        if file is None:
            continue
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"CSV file not found: {file}")
        with file.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise ValueError(f"{file}: needs a header with 'path' and 'label' columns, got {reader.fieldnames}")
            rows_by_split[split] = [dict(r, _base=str(file.parent)) for r in reader]
    if not rows_by_split:
        raise ValueError("read_csv_splits needs at least one CSV file")
    all_rows = [r for rows in rows_by_split.values() for r in rows]
    integer_labels = all(r["label"].strip().lstrip("-").isdigit() for r in all_rows)
    names = list(classnames) if classnames is not None else None
    if names is None and not integer_labels:
        names = sorted({r["label"].strip() for r in all_rows})
    if names is None:
        by_label = {int(r["label"]): (r.get("classname") or "").strip() for r in all_rows}
        if any(not v for v in by_label.values()):
            raise ValueError("CSV rows have integer labels but no 'classname' column; pass classnames=[...]")
        names = [by_label.get(i, "") for i in range(max(by_label) + 1)]
    index = {n: i for i, n in enumerate(names)}
    for split, rows in rows_by_split.items():
        samples = []
        for r in rows:
            raw = r["label"].strip()
            if raw.lstrip("-").isdigit():
                label = int(raw)
                if not 0 <= label < len(names):
                    raise ValueError(f"label {label} out of range for {len(names)} classes ({r['path']})")
            elif raw in index:
                label = index[raw]
            else:
                raise ValueError(f"unknown class name {raw!r} in CSV (known: {names[:20]}...)")
            path = Path(r["path"])
            path = path if path.is_absolute() else Path(r["_base"]) / path
            samples.append(Sample(str(path), label, names[label]))
        setattr(out, split, samples)
    out.classnames = names
    return out
