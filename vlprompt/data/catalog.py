"""Catalog of dataset descriptors for the standard prompt-learning benchmarks.

Each supported dataset (the 11 CoOp few-shot datasets and the 4 ImageNet
domain-shift test sets) is described by a small YAML file in the repository's
top-level ``datasets/`` folder (shipped as ``vlprompt/_datasets`` inside a
wheel). A descriptor records *where* a prepared copy of the dataset lives under
a user's data root (the CoOp ``$DATA`` layout), how its labels are stored, the
hand-written CoOp prompt template, and documentation on how to obtain and
prepare the files. Nothing here downloads or reads images.

Typical use::

    from vlprompt.data.catalog import load_descriptor, check_prepared

    desc = load_descriptor("oxford-pets")
    problems = check_prepared(desc, "/data")
    if problems:
        raise SystemExit("\\n".join(problems))
    paths = desc.paths("/data")          # {'folder': ..., 'image_dir': ..., 'split_file': ...}
    prompt = desc.format_prompt("Abyssinian")   # 'a photo of a Abyssinian, a type of pet.'

Schema (keys of a descriptor YAML; see ``datasets/README.md``):

``name``, ``display_name``, ``num_classes``, ``format``, ``folder``,
``image_dir``, ``template``, ``classnames_from``, ``role``, ``sources``,
``layout`` and ``prepare`` are required. ``split_file``, ``classnames_file``,
``train_dir``, ``test_dir``, ``folder_names``, ``class_subset``,
``variant_files`` and ``notes`` are optional in general but required by some
formats:

* ``dassl`` (also written ``dassl_split``): images plus a CoOp ``split_zhou_*.json`` file
  (``split_file`` required).
* ``imagefolder``: one sub-folder per class (``test_dir`` and
  ``folder_names`` required; ``train_dir`` optional for test-only sets).
* ``fgvc_variants``: FGVC-Aircraft's own ``images_variant_{train,val,test}.txt``
  lists (``variant_files`` with keys train/val/test and ``classnames_file``,
  the one-name-per-line ``variants.txt``, required).
"""

from __future__ import annotations

import logging
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from vlprompt.data.classnames import fill_template
from vlprompt.data.formats import format_names, get_format
from vlprompt.data.samples import SplitSamples

__all__ = [
    "CLASSNAMES_SOURCES",
    "CLASS_SUBSETS",
    "FOLDER_NAMES",
    "FORMATS",
    "ROLES",
    "DatasetDescriptor",
    "check_prepared",
    "descriptor_dir",
    "list_datasets",
    "load_all",
    "load_descriptor",
]

logger = logging.getLogger(__name__)

#: Storage formats a descriptor may name: the registered classification formats that read a
#: descriptor (:mod:`vlprompt.data.formats`), with their old names (``dassl_split`` is ``dassl``).
FORMATS: frozenset[str] = frozenset(format_names("classification", aliases=True, descriptor=True))
#: Where class names come from.
CLASSNAMES_SOURCES: frozenset[str] = frozenset({"split_file", "classnames_file", "open_clip_imagenet"})
#: How class folders are named in an ``imagefolder`` dataset.
FOLDER_NAMES: frozenset[str] = frozenset({"wnid", "index"})
#: How a class subset of ImageNet is defined.
CLASS_SUBSETS: frozenset[str] = frozenset({"from_folders"})
#: What a dataset is used for.
ROLES: frozenset[str] = frozenset({"fewshot", "domain_shift_target"})
#: How a dataset is scored: top-1 accuracy or the mean of the per-class accuracies (ELEVATER).
METRICS: frozenset[str] = frozenset({"accuracy", "mean_per_class"})

_REQUIRED_STR_KEYS: tuple[str, ...] = (
    "name",
    "display_name",
    "format",
    "folder",
    "image_dir",
    "template",
    "classnames_from",
    "role",
    "layout",
    "prepare",
)
_OPTIONAL_STR_KEYS: tuple[str, ...] = (
    "split_file",
    "classnames_file",
    "train_dir",
    "test_dir",
    "folder_names",
    "class_subset",
    "notes",
    "metric",
)
_REQUIRED_KEYS: tuple[str, ...] = _REQUIRED_STR_KEYS + ("num_classes", "sources")
_KNOWN_KEYS: frozenset[str] = frozenset(_REQUIRED_KEYS + _OPTIONAL_STR_KEYS + ("variant_files", "classnames"))
_SUFFIX = ".yaml"


@dataclass(frozen=True)
class DatasetDescriptor:
    """Static description of one benchmark dataset (one ``datasets/<name>.yaml``).

    Path-like fields are relative: ``folder`` to the data root, ``image_dir``,
    ``split_file``, ``classnames_file`` and ``variant_files`` to ``folder``,
    ``train_dir`` and ``test_dir`` to ``image_dir``. Use :meth:`paths` to resolve
    them against a data root.
    """

    name: str
    display_name: str
    num_classes: int
    format: str
    folder: str
    image_dir: str
    template: str
    classnames_from: str
    role: str
    sources: dict[str, str] = field(hash=False)
    layout: str
    prepare: str
    split_file: Optional[str] = None
    classnames_file: Optional[str] = None
    train_dir: Optional[str] = None
    test_dir: Optional[str] = None
    folder_names: Optional[str] = None
    class_subset: Optional[str] = None
    variant_files: Optional[dict[str, str]] = field(default=None, hash=False)
    notes: Optional[str] = None
    metric: Optional[str] = None
    classnames: Optional[tuple[str, ...]] = field(default=None, hash=False)
    #: The YAML file this descriptor was read from (not part of equality).
    source_path: Optional[Path] = field(default=None, compare=False, repr=False)

    @property
    def is_test_only(self) -> bool:
        """True for sets with no training images (the ImageNet domain-shift targets)."""
        return self.role == "domain_shift_target"

    def format_prompt(self, classname: str) -> str:
        """Fill the CoOp hand-written template with ``classname`` (one full stop at the end,
        :func:`~vlprompt.data.classnames.fill_template`)."""
        return fill_template(self.template, classname)

    def paths(self, root: str | Path) -> dict[str, Path]:
        """Resolve this dataset's locations under the data root ``root``.

        Returns a dict with ``folder`` and ``image_dir`` always, plus
        ``split_file``, ``classnames_file``, ``train_dir`` and ``test_dir`` when
        the descriptor defines them, and ``variant_<split>`` for each entry of
        ``variant_files``. Paths are absolute and normalised (symlinks are not
        followed); nothing is checked for existence.
        """
        def norm(p: Path) -> Path:
            # Absolute and normalised ('.'/'..' collapsed) without following
            # symlinks, so messages show the paths the user laid out.
            return Path(os.path.abspath(p))

        folder = norm(Path(root).expanduser() / self.folder)
        image_dir = norm(folder / self.image_dir)
        out: dict[str, Path] = {"folder": folder, "image_dir": image_dir}
        if self.split_file is not None:
            out["split_file"] = norm(folder / self.split_file)
        if self.classnames_file is not None:
            out["classnames_file"] = norm(folder / self.classnames_file)
        if self.train_dir is not None:
            out["train_dir"] = norm(image_dir / self.train_dir)
        if self.test_dir is not None:
            out["test_dir"] = norm(image_dir / self.test_dir)
        for split, rel in (self.variant_files or {}).items():
            out[f"variant_{split}"] = norm(folder / rel)
        return out


# --------------------------------------------------------------------------- discovery


def descriptor_dir() -> Path:
    """Return the folder holding the dataset YAML files.

    Looks first for ``vlprompt/_datasets`` inside the installed package (where a
    wheel build puts the top-level ``datasets/`` folder), then for the
    repository's top-level ``datasets/`` folder (source checkout or editable
    install).

    Raises:
        FileNotFoundError: if neither folder exists.
    """
    from vlprompt.resources import bundled_dir

    return bundled_dir("datasets")


def _resolve_dir(directory: str | Path | None) -> Path:
    return descriptor_dir() if directory is None else Path(directory)


def list_datasets(directory: str | Path | None = None) -> list[str]:
    """Sorted names (file stems) of the descriptors in ``directory`` (default: :func:`descriptor_dir`)."""
    d = _resolve_dir(directory)
    return sorted(p.stem for p in d.glob(f"*{_SUFFIX}") if p.is_file())


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _lookup(name: str, known: list[str]) -> Optional[str]:
    """Match ``name`` against ``known`` stems: case-insensitive, '-' == '_', then ignoring '_'."""
    wanted = _normalize(name)
    for stem in known:
        if _normalize(stem) == wanted:
            return stem
    squashed = wanted.replace("_", "")
    matches = [stem for stem in known if _normalize(stem).replace("_", "") == squashed]
    return matches[0] if len(matches) == 1 else None


# --------------------------------------------------------------------------- loading


def _fail(path: Path, key: str, problem: str) -> ValueError:
    return ValueError(f"{path}: key {key!r}: {problem}")


def _get_str(data: Mapping[str, Any], key: str, path: Path, *, required: bool) -> Optional[str]:
    if key not in data or data[key] is None:
        if required:
            raise _fail(path, key, "missing required key")
        return None
    value = data[key]
    if not isinstance(value, str):
        raise _fail(path, key, f"expected a string, got {type(value).__name__} ({value!r})")
    if required and not value.strip():
        raise _fail(path, key, "must not be empty")
    return value


def _get_str_map(value: Any, key: str, path: Path) -> dict[str, str]:
    if not isinstance(value, Mapping) or not value:
        raise _fail(path, key, "expected a non-empty mapping of strings")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _fail(path, key, f"entry {k!r}: keys and values must be strings")
        out[k] = v
    return out


def _check_choice(value: Optional[str], allowed: frozenset[str], key: str, path: Path) -> None:
    if value is not None and value not in allowed:
        raise _fail(path, key, f"unknown value {value!r}; expected one of {sorted(allowed)}")


def _check_keys(data: Any, path: Path) -> None:
    """A mapping with every required key; unknown keys are logged and ignored."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in data or data[k] is None]
    if missing:
        raise _fail(path, missing[0], "missing required key" + (
            f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        logger.warning("%s: ignoring unknown key(s): %s", path, ", ".join(map(str, unknown)))


def _read_num_classes(data: Mapping[str, Any], path: Path) -> int:
    num_classes = data["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise _fail(path, "num_classes", f"expected a positive integer, got {num_classes!r}")
    return num_classes


def _check_choices(s: Mapping[str, Optional[str]], path: Path) -> None:
    for key, allowed in (("format", FORMATS), ("classnames_from", CLASSNAMES_SOURCES), ("role", ROLES),
                         ("folder_names", FOLDER_NAMES), ("class_subset", CLASS_SUBSETS), ("metric", METRICS)):
        _check_choice(s[key], allowed, key, path)


def _read_classnames(data: Mapping[str, Any], num_classes: int, path: Path) -> Optional[tuple[str, ...]]:
    classnames = data.get("classnames")
    if classnames is None:
        return None
    if not isinstance(classnames, list) or not all(isinstance(c, (str, int)) for c in classnames):
        raise _fail(path, "classnames", "expected a list of class names")
    if len(classnames) != num_classes:
        raise _fail(path, "classnames", f"lists {len(classnames)} names but num_classes is {num_classes}")
    return tuple(str(c) for c in classnames)


def _check_template(template: str, path: Path) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise _fail(path, "template", f"not a valid format string: {exc}") from None
    if fields != [""]:
        raise _fail(path, "template", f"must contain '{{}}' exactly once and no other fields: {template!r}")


def _read_sources(data: Mapping[str, Any], path: Path) -> dict[str, str]:
    sources = _get_str_map(data["sources"], "sources", path)
    if "images" not in sources:
        raise _fail(path, "sources", "must have an 'images' entry")
    return sources


def _check_format_fields(fields: Mapping[str, Any], path: Path) -> None:
    """Cross-field rules: where class names come from, and what the format needs and allows
    (each registered format declares its own keys and checks)."""
    if fields["classnames_from"] == "split_file" and fields["split_file"] is None:
        raise _fail(path, "split_file", "required when classnames_from is 'split_file'")
    if fields["classnames_from"] == "classnames_file" and fields["classnames_file"] is None:
        raise _fail(path, "classnames_file", "required when classnames_from is 'classnames_file'")
    written = fields["format"]
    fmt = get_format(written, "classification")
    problem = fmt.check_descriptor(fields, written) if fmt.check_descriptor is not None else None
    if problem is not None:
        raise _fail(path, *problem)
    for other in (get_format(n) for n in format_names("classification", descriptor=True)):
        for key in other.descriptor_keys:
            if other is not fmt and fields.get(key) is not None:
                raise _fail(path, key, f"only allowed with format {other.name!r}, not {written!r}")


def _parse(data: Any, path: Path) -> DatasetDescriptor:
    """Validate the parsed YAML ``data`` of ``path`` and build a descriptor."""
    _check_keys(data, path)
    s: dict[str, Optional[str]] = {k: _get_str(data, k, path, required=True) for k in _REQUIRED_STR_KEYS}
    s.update({k: _get_str(data, k, path, required=False) for k in _OPTIONAL_STR_KEYS})
    if s["name"] != path.stem:
        raise _fail(path, "name", f"{s['name']!r} does not match the file stem {path.stem!r}")
    num_classes = _read_num_classes(data, path)
    _check_choices(s, path)
    classnames = _read_classnames(data, num_classes, path)
    _check_template(s["template"], path)  # type: ignore[arg-type]
    sources = _read_sources(data, path)
    variant_files = None
    if data.get("variant_files") is not None:
        variant_files = _get_str_map(data["variant_files"], "variant_files", path)
    fields: dict[str, Any] = {**s, "variant_files": variant_files}
    _check_format_fields(fields, path)
    return DatasetDescriptor(**fields, num_classes=num_classes, sources=sources, classnames=classnames,
                             source_path=path)


def load_descriptor(name: str, directory: str | Path | None = None) -> DatasetDescriptor:
    """Load and validate the descriptor called ``name``.

    Matching is case-insensitive and treats '-' and '_' alike (``"Oxford-Pets"``
    finds ``oxford_pets.yaml``); as a fallback, underscores are ignored
    (``"imagenetv2"`` finds ``imagenet_v2.yaml``).

    Args:
        name: dataset name.
        directory: folder of YAML files; defaults to :func:`descriptor_dir`.

    Raises:
        KeyError: unknown name (the message lists the known names).
        ValueError: the YAML is malformed, misses a required key or has an
            invalid value (the message names the file and the key).
    """
    d = _resolve_dir(directory)
    known = list_datasets(d)
    stem = _lookup(name, known)
    if stem is None:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(known) or '(none)'} (in {d})")
    path = d / f"{stem}{_SUFFIX}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    desc = _parse(data, path)
    logger.debug("loaded dataset descriptor %s from %s", desc.name, path)
    return desc


def load_all(directory: str | Path | None = None) -> dict[str, DatasetDescriptor]:
    """Load every descriptor in ``directory`` (default: :func:`descriptor_dir`), keyed by name."""
    d = _resolve_dir(directory)
    return {stem: load_descriptor(stem, d) for stem in list_datasets(d)}


# --------------------------------------------------------------------------- checking


def check_prepared(desc: DatasetDescriptor, root: str | Path) -> list[str]:
    """List what is missing for ``desc`` under the data root ``root``.

    Only the folder layout is checked (folders exist, expected files exist);
    no image is opened and folder contents are not counted. Every expected
    item is checked even when the dataset folder itself is missing, so the
    result doubles as a to-do list.

    Returns:
        Human-readable problems; an empty list when the layout looks prepared.
    """
    root_path = Path(root).expanduser()
    problems: list[str] = []
    hint = f"see 'prepare' in {desc.source_path.name if desc.source_path else desc.name + _SUFFIX}"
    if not root_path.is_dir():
        problems.append(f"data root not found: {root_path}")

    p = desc.paths(root_path)
    if not p["folder"].is_dir():
        problems.append(f"{desc.name}: dataset folder not found: {p['folder']} ({hint})")
    if p["image_dir"] != p["folder"] and not p["image_dir"].is_dir():
        problems.append(f"{desc.name}: image folder not found: {p['image_dir']} ({hint})")
    if "split_file" in p and not p["split_file"].is_file():
        where = desc.sources.get("split", "see the descriptor's sources")
        problems.append(f"{desc.name}: split file not found: {p['split_file']} (source: {where})")
    if "classnames_file" in p and not p["classnames_file"].is_file():
        problems.append(f"{desc.name}: class-names file not found: {p['classnames_file']} ({hint})")
    for key, label in (("train_dir", "train folder"), ("test_dir", "test folder")):
        if key in p and p[key] != p["image_dir"] and not p[key].is_dir():
            problems.append(f"{desc.name}: {label} not found: {p[key]} ({hint})")
    for split in sorted(desc.variant_files or {}):
        f = p[f"variant_{split}"]
        if not f.is_file():
            problems.append(f"{desc.name}: {split} variant list not found: {f} ({hint})")

    if problems:
        logger.info("dataset %s is not prepared under %s (%d problem(s))", desc.name, root_path, len(problems))
    else:
        logger.debug("dataset %s looks prepared under %s", desc.name, root_path)
    return problems


# --------------------------------------------------------------------------- reading samples


def read_descriptor_samples(desc: DatasetDescriptor, root: str | Path) -> SplitSamples:
    """Read the samples of the prepared dataset ``desc`` under the data root ``root``, with the
    reader its format registers (:mod:`vlprompt.data.formats`): e.g. ImageNet-style class folders
    mapped to class names through ``classnames_file`` (sets covering a subset of ImageNet's classes,
    ImageNet-A/-R, keep the classes whose folders are present), FGVC-Aircraft's variant lists or a
    CoOp split file. Test-only sets have empty train/val splits.
    """
    return get_format(desc.format, "classification").read_descriptor(desc, root)
