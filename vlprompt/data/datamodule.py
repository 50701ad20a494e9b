"""``FewShotDataModule``: few-shot train/val/test loaders over any supported dataset format."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from vlprompt.data.classnames import check_distinct_classnames, normalize_classname
from vlprompt.data.fewshot import (
    ClassSubset,
    default_cache_dir,
    load_or_sample_few_shot,
    sample_few_shot,
    subset_classes,
)
from vlprompt.data.formats import ClassificationSource, detect_format, get_format
from vlprompt.data.images import (
    DEFAULT_PREPROCESS,
    ImageDataset,
    OnError,
    SplitLoaders,
    build_eval_transform,
    build_train_transform,
)
from vlprompt.data.samples import SplitSamples

__all__ = ["DEFAULT_PREPROCESS", "FewShotDataModule"]

log = logging.getLogger(__name__)

#: ``auto`` or a registered classification format (:func:`~vlprompt.data.formats.format_names`).
DataFormat = str


class FewShotDataModule(SplitLoaders, pl.LightningDataModule):
    """Few-shot classification data in the CoOp protocol.

    The training set holds ``shots`` images per class drawn with ``seed`` (saved as JSON and
    reused), validation ``min(shots, 4)`` per class, and the test set is complete. ``subset``
    keeps the base or novel half of the classes (base-to-novel protocol). Implements
    :class:`~vlprompt.data.protocol.ClassificationData`: class names flow to the model through
    :attr:`classnames`; the model hands back its preprocessing through :meth:`set_preprocess`.
    Class names are normalised as the reference implementations do (underscores to spaces) and
    must be distinct. Under DDP, evaluation loaders split the data without padding.

    Args:
        root: dataset folder (Dassl folder, ImageFolder root, or the DATA root when ``dataset``
            names a descriptor from ``datasets/``).
        dataset: name of a standard dataset descriptor (``oxford_pets``, ``imagenet`` ...).
        format: ``dassl`` (split JSON; ``dassl_split`` is an alias), ``imagefolder``, ``csv``, another
            registered classification format, or ``auto`` (detect).
        split_file: the Dassl split JSON (default: the one ``split_zhou_*.json`` in ``root``).
        image_dir: folder the split file's paths are relative to (default ``root/images``).
        train_csv, val_csv, test_csv: CSV files for ``format="csv"``.
        classnames: class names by label, for CSVs whose labels are integers or to check data
            against the names a user expects.
        classnames_file: class names of ImageFolder folders, one per line in label order, either
            plain names matching the folders or ``<folder> <name>`` lines (ImageNet's classnames.txt).
        shots: images per class for training (``-1``: all).
        seed: seed of the few-shot draw.
        test_per_class: test on this many images per class, drawn with ``seed`` (all when None):
            quicker evaluations, e.g. of test-time tuning.
        subset: ``all``, ``base`` or ``novel`` classes.
        augment: random resized crop + flip for training (CoOp); off gives eval preprocessing.
        crop_scale: scale range of the random resized crop.
        augment_seed: seed the augmentation per image and epoch (:func:`~vlprompt.data.images.view_seed`:
            from the image's content, so every shot count and draw of a sweep sees the same view of
            an image at a given epoch, whatever the workers); needed by a feature bank. None: the
            global random state, as usual.
        on_error: ``skip`` unreadable images (logged and counted) or ``raise``.
        fewshot_dir: where few-shot draws are saved (default: a folder per dataset identity under
            the vlprompt cache, ``$VLPROMPT_CACHE_DIR`` or ``~/.cache/vlprompt``; never the data folder).
        val_from_train: take the validation images out of the ``shots`` training images (per
            class the first ``ceil(0.2 * shots)`` of the draw; with one shot, the same image), as
            ELEVATER and MVLPT count "k shots". Off by default: validation images are drawn from
            the validation split, ``min(shots, 4)`` per class (CoOp).
        drop_last: drop the last incomplete training batch when a full one remains (Dassl's
            loader). A method can ask for it too: ``PromptModule(drop_last=True)``, as the paper
            recipes under ``configs/methods/`` do.
    """

    def __init__(
        self,
        root: str,
        *,
        dataset: str | None = None,
        format: DataFormat = "auto",
        split_file: str | None = None,
        image_dir: str | None = None,
        train_csv: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        classnames: list[str] | None = None,
        classnames_file: str | None = None,
        shots: int = 16,
        seed: int = 1,
        subset: ClassSubset = "all",
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 2,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        augment_seed: int | None = None,
        on_error: OnError = "skip",
        fewshot_dir: str | None = None,
        test_per_class: int | None = None,
        val_from_train: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.drop_last = drop_last
        self.root = Path(root).expanduser()
        self.shots, self.seed, self.subset = shots, seed, subset
        if test_per_class is not None and test_per_class < 1:
            raise ValueError(f"test_per_class must be >= 1 or None, got {test_per_class}")
        self.test_per_class = test_per_class
        self.val_from_train = val_from_train
        #: how the task is scored (``accuracy`` or ``mean_per_class``), from a dataset descriptor
        self.metric: str | None = None
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.augment, self.crop_scale, self.on_error = augment, tuple(crop_scale), on_error
        self.augment_seed = augment_seed
        self.template: str | None = None
        source = ClassificationSource(self.root, split_file, image_dir, train_csv, val_csv, test_csv, classnames,
                                      classnames_file, seed)
        self.samples = self._read(dataset, format, source)
        if classnames is not None and format != "csv":
            self._check_expected_classnames(classnames)
        check_distinct_classnames(self.samples.classnames, str(self.root))
        self.fewshot_dir = Path(fewshot_dir).expanduser() if fewshot_dir else self._default_fewshot_dir(dataset)
        _, self.classnames = subset_classes([], self.samples.classnames, subset)
        self.preprocess_cfg: dict[str, Any] = dict(DEFAULT_PREPROCESS)
        self.datasets: dict[str, ImageDataset] = {}
        self.eval_transform: Callable | None = None

    # -- reading -------------------------------------------------------------------------------
    def _read(self, dataset: str | None, fmt: str, source: ClassificationSource) -> SplitSamples:
        self._folder = self.root
        if dataset is not None:
            return self._read_descriptor(dataset)
        if fmt == "auto":
            return detect_format("classification", source).read(source)
        return get_format(fmt, "classification", extra=("auto",)).read(source)

    def _read_descriptor(self, name: str) -> SplitSamples:
        from vlprompt.data.catalog import check_prepared, load_descriptor, read_descriptor_samples

        desc = load_descriptor(name)
        problems = check_prepared(desc, self.root)
        if problems:
            raise FileNotFoundError(
                f"{desc.display_name} is not prepared under {self.root}:\n  - " + "\n  - ".join(problems)
                + f"\nSee datasets/{desc.name}.yaml for the expected layout and how to prepare it."
            )
        self._folder = desc.paths(self.root)["folder"]
        self.template = desc.template
        self.metric = getattr(desc, "metric", None)
        return read_descriptor_samples(desc, self.root)

    def _default_fewshot_dir(self, dataset: str | None) -> Path:
        # Keyed by what the data is (folder, classes, every split's samples): data that changes
        # gets a new draw instead of a stale one.
        import hashlib

        from vlprompt.data.fewshot import samples_digest

        identity = hashlib.sha256("|".join(
            [str(self._folder.resolve()), *self.samples.classnames,
             *(samples_digest(self.samples.split(s)) for s in ("train", "val", "test"))]).encode()).hexdigest()[:12]
        name = dataset or self._folder.resolve().name or "data"
        return default_cache_dir() / "fewshot" / f"{name}-{identity}"

    def _check_expected_classnames(self, expected: list[str]) -> None:
        found = self.samples.classnames
        if [normalize_classname(c).lower() for c in expected] != [c.lower() for c in found]:
            unknown = sorted(set(expected) - set(found))
            raise ValueError(
                f"the class names given ({len(expected)}) do not match the data ({len(found)}); "
                f"unknown to the data: {unknown[:10]}; data has: {found[:10]}..."
            )

    # -- preprocessing handed over by the model -------------------------------------------------
    def set_preprocess(self, preprocess_cfg: dict[str, Any]) -> None:
        """Use the backbone's image size and normalisation (called by the method at setup)."""
        self.preprocess_cfg = dict(preprocess_cfg)
        for split, ds in self.datasets.items():
            ds.set_transform(*self._transform(split))

    def set_eval_transform(self, transform: Callable | None) -> None:
        """Replace the evaluation transform of the test split, e.g. by test-time views (TPT);
        None goes back to the backbone's preprocessing."""
        self.eval_transform = transform
        if "test" in self.datasets:
            self.datasets["test"].set_transform(*self._transform("test"))

    def _transform(self, split: str) -> tuple[Callable, Any]:
        """The transform of ``split`` and a description of it (part of the dataset fingerprint)."""
        if split == "test" and self.eval_transform is not None:
            return self.eval_transform, {"views": repr(self.eval_transform)}
        if split == "train" and self.augment:
            key = {"preprocess": self.preprocess_cfg, "augment": list(self.crop_scale), "augment_seed": self.augment_seed}
            return build_train_transform(self.preprocess_cfg, scale=self.crop_scale), key
        return build_eval_transform(self.preprocess_cfg), {"preprocess": self.preprocess_cfg}

    def dataset(self, split: str) -> ImageDataset | None:
        """The dataset serving ``split`` (``predict`` reads the test split), None before set-up."""
        return self.datasets.get("test" if split == "predict" else split)

    @property
    def train_augmentation(self) -> bool:
        """Whether training images are randomly augmented (cached features would freeze one view)."""
        return self.augment

    # -- Lightning hooks -------------------------------------------------------------------------
    def split_samples(self, split: str):
        """Samples of ``split`` after few-shot sampling and class subsetting."""
        samples = self.samples.split(split)
        cache = self.fewshot_dir / f"shot_{self.shots}-seed_{self.seed}.json"
        if split != "test" and self.shots >= 1 and self.val_from_train:
            drawn = load_or_sample_few_shot(self.samples.train, self.shots, self.seed, cache, "train", self.samples.classnames)
            samples = _carve_validation(drawn)[split]
        elif split != "test" and self.shots >= 1:
            shots = self.shots if split == "train" else min(self.shots, 4)
            samples = load_or_sample_few_shot(samples, shots, self.seed, cache, split, self.samples.classnames)
        if split == "test" and self.test_per_class is not None:
            samples = sample_few_shot(samples, self.test_per_class, self.seed)
        samples, _ = subset_classes(samples, self.samples.classnames, self.subset)
        return samples

    def _empty_hint(self) -> str:
        return f" (subset={self.subset})"

    def build_dataset(self, split: str, samples: list) -> ImageDataset:
        present = {s.label for s in samples}
        empty = [name for label, name in enumerate(self.classnames) if label not in present]
        if empty and split == "train":
            raise ValueError(f"{self.root}: classes without training images: {empty[:10]}; add images or drop the classes")
        if empty:
            log.warning("%s split: %d classes have no images and cannot be scored: %s",
                        split, len(empty), ", ".join(empty[:10]))
        transform, key = self._transform(split)
        log.info("%s: %d images, %d classes", split, len(samples), len(self.classnames))
        seeded = split == "train" and self.augment and self.augment_seed is not None
        return ImageDataset(samples, transform, on_error=self.on_error, transform_key=key,
                            augment_seed=self.augment_seed if seeded else None)


def _carve_validation(drawn: list) -> dict[str, list]:
    """Split a k-shot draw into validation (the first ``ceil(0.2 * k)`` images of each class) and
    training (the rest; the validation images too when nothing is left, as with one shot)."""
    by_class: dict[int, list] = {}
    for sample in drawn:
        by_class.setdefault(sample.label, []).append(sample)
    out: dict[str, list] = {"train": [], "val": []}
    for group in by_class.values():
        n_val = math.ceil(0.2 * len(group))
        out["val"] += group[:n_val]
        out["train"] += group[n_val:] or group
    return out
