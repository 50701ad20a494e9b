"""CSV files with ``path,label`` rows (optionally a ``classname`` column), one file per split."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from vlprompt.data.classnames import check_distinct_classnames, normalize_classname
from vlprompt.data.formats.registry import ClassificationSource, register_format
from vlprompt.data.samples import Sample, SplitSamples

__all__ = ["read_csv_splits"]

Rows = list[dict[str, str]]


def _read_rows(file: Path) -> Rows:
    """The rows of one CSV file, each with ``_base``: the folder relative paths start from."""
    if not file.is_file():
        raise FileNotFoundError(f"CSV file not found: {file}")
    with file.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{file}: needs a header with 'path' and 'label' columns, got {reader.fieldnames}")
        return [dict(r, _base=str(file.parent)) for r in reader]


def _is_integer(label: str) -> bool:
    return label.strip().lstrip("-").isdigit()


def _names_of_integer_labels(rows: Rows, first: str) -> list[str]:
    """Class names by label from the ``classname`` column of integer-labelled rows."""
    by_label = {int(r["label"]): normalize_classname(r.get("classname") or "") for r in rows}
    if any(not v for v in by_label.values()):
        raise ValueError("CSV rows have integer labels but no 'classname' column; pass classnames=[...]")
    names = [by_label.get(i, "") for i in range(max(by_label) + 1)]
    if "" in names:
        raise ValueError(f"{first} CSV: labels {[i for i, n in enumerate(names) if not n][:10]} have no rows")
    return names


def _classnames(rows_by_split: Mapping[str, Rows], first: str, classnames: Sequence[str] | None) -> list[str]:
    """The classes: ``classnames`` when given, else those of the ``first`` CSV's rows."""
    if classnames is not None:
        return [normalize_classname(n) for n in classnames]
    if not all(_is_integer(r["label"]) for rows in rows_by_split.values() for r in rows):
        return sorted({normalize_classname(r["label"]) for r in rows_by_split[first]})
    return _names_of_integer_labels(rows_by_split[first], first)


def _label(raw: str, names: list[str], index: Mapping[str, int], where: str, classes_from: str) -> int:
    """The label of a row's ``label`` field: an integer in range, or a known class name."""
    raw = raw.strip()
    if raw.lstrip("-").isdigit():
        label = int(raw)
        if not 0 <= label < len(names):
            raise ValueError(f"{where}: label {label} out of range for {len(names)} classes")
        return label
    if normalize_classname(raw).lower() in index:
        return index[normalize_classname(raw).lower()]
    raise ValueError(f"{where}: unknown class {raw!r}; the classes are those of the {classes_from}: {names[:20]}")


def _samples(split: str, rows: Rows, names: list[str], classes_from: str) -> list[Sample]:
    index = {n.lower(): i for i, n in enumerate(names)}
    samples = []
    for row_number, r in enumerate(rows, start=2):
        label = _label(r["label"], names, index, f"{split} CSV, row {row_number}", classes_from)
        path = Path(r["path"])
        path = path if path.is_absolute() else Path(r["_base"]) / path
        samples.append(Sample(str(path), label, names[label]))
    return samples


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
    files = {"train": train, "val": val, "test": test}
    rows_by_split = {split: _read_rows(Path(file)) for split, file in files.items() if file is not None}
    if not rows_by_split:
        raise ValueError("read_csv_splits needs at least one CSV file")
    first = next(iter(rows_by_split))  # class names come from the train CSV, or the first one given
    names = _classnames(rows_by_split, first, classnames)
    check_distinct_classnames(names, "CSV class names")
    classes_from = "given classnames" if classnames is not None else first + " CSV"
    out = SplitSamples(classnames=names)
    for split, rows in rows_by_split.items():
        setattr(out, split, _samples(split, rows, names, classes_from))
    return out


def _has_csv_files(source: ClassificationSource) -> bool:
    return bool(source.train_csv or source.val_csv or source.test_csv)


@register_format("csv", task="classification", detect=_has_csv_files)
def read_csv_source(source: ClassificationSource) -> SplitSamples:
    """The CSV files ``train_csv``, ``val_csv`` and ``test_csv`` (see :func:`read_csv_splits`)."""
    return read_csv_splits(source.train_csv, source.val_csv, source.test_csv, classnames=source.classnames)
