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

from vlprompt.data.classnames import check_distinct_classnames, normalize_classname, read_classnames_file
from vlprompt.data.files import IMAGE_EXTENSIONS, list_images

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "SplitSamples",
    "read_csv_splits",
    "read_dassl_split",
    "read_imagefolder",
]

log = logging.getLogger(__name__)

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
            samples = [Sample(str(image_dir / path), int(label), normalize_classname(name)) for path, label, name in rows]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{split_file}: '{split}' rows must be [path, label, classname] ({err})") from err
        setattr(out, split, samples)
    out.classnames = _classnames_from_samples(out.train + out.val + out.test, str(split_file))
    check_distinct_classnames(out.classnames, str(split_file))
    return out


def _read_class_folders(root: Path, classes: list[str] | None) -> tuple[list[str], dict[str, list[Path]]]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = classes or sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class folders found (expected {root}/<class name>/<images>)")
    splits = sorted(root.glob("split_*.json"))
    if classes is None and (splits or folders == ["images"]):
        found = f" ({splits[0].name})" if splits else ""
        raise ValueError(
            f"{root} looks like a CoOp/Dassl dataset folder{found}, not an ImageFolder tree: read as one it "
            "would be a single class 'images'. Use format: dassl (or auto), or point root at the folder "
            "holding one sub-folder per class"
        )
    if classes is None and len(folders) < 2:
        raise ValueError(
            f"{root}: only one class folder ({folders[0]!r}); a classifier needs at least 2. Expected "
            f"{root}/<class name>/<images>"
        )
    images = {}
    for folder in folders:
        path = root / folder
        if not path.is_dir():
            raise FileNotFoundError(f"class folder missing: {path}")
        images[folder] = list_images(path)
        if not images[folder]:
            raise ValueError(f"class folder {path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        if all(p.parent != path for p in images[folder]):
            raise ValueError(
                f"class folder {path} holds its images only in sub-folders ({images[folder][0].parent}); expected "
                f"{root}/<class name>/<images>. Point root at the folder whose sub-folders are the classes"
            )
    return folders, images


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
        folders, _ = _read_class_folders(root / presplit[0], None)
        folders, names = folder_classnames(folders, classnames_file, str(root))
        for split in presplit:
            _, images = _read_class_folders(root / split, folders)
            setattr(out, split, [Sample(str(p), label, names[label]) for label, f in enumerate(folders) for p in images[f]])
    else:
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
    out.classnames = names
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
    names. The classes are ``classnames`` when given, else those of the train CSV (or of the first
    CSV given); a label of another class elsewhere is an error, never a new class."""
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
    first = next(iter(rows_by_split))  # class names come from the train CSV, or the first one given
    integer_labels = all(r["label"].strip().lstrip("-").isdigit() for rows in rows_by_split.values() for r in rows)
    names = [normalize_classname(n) for n in classnames] if classnames is not None else None
    if names is None and not integer_labels:
        names = sorted({normalize_classname(r["label"]) for r in rows_by_split[first]})
    if names is None:
        by_label = {int(r["label"]): normalize_classname(r.get("classname") or "") for r in rows_by_split[first]}
        if any(not v for v in by_label.values()):
            raise ValueError("CSV rows have integer labels but no 'classname' column; pass classnames=[...]")
        names = [by_label.get(i, "") for i in range(max(by_label) + 1)]
        if "" in names:
            raise ValueError(f"{first} CSV: labels {[i for i, n in enumerate(names) if not n][:10]} have no rows")
    check_distinct_classnames(names, "CSV class names")
    index = {n.lower(): i for i, n in enumerate(names)}
    for split, rows in rows_by_split.items():
        samples = []
        for row_number, r in enumerate(rows, start=2):
            raw = r["label"].strip()
            if raw.lstrip("-").isdigit():
                label = int(raw)
                if not 0 <= label < len(names):
                    raise ValueError(f"{split} CSV, row {row_number}: label {label} out of range for {len(names)} classes")
            elif normalize_classname(raw).lower() in index:
                label = index[normalize_classname(raw).lower()]
            else:
                raise ValueError(
                    f"{split} CSV, row {row_number}: unknown class {raw!r}; the classes are those of the "
                    f"{'given classnames' if classnames is not None else first + ' CSV'}: {names[:20]}"
                )
            path = Path(r["path"])
            path = path if path.is_absolute() else Path(r["_base"]) / path
            samples.append(Sample(str(path), label, names[label]))
        setattr(out, split, samples)
    out.classnames = names
    return out
