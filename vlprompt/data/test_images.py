"""``TestImagesDataModule``: a user's own folder of images to classify at test time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from vlprompt.data.classnames import check_distinct_classnames, normalize_classname, read_classnames_file
from vlprompt.data.datamodule import DEFAULT_PREPROCESS
from vlprompt.data.files import IMAGE_EXTENSIONS, list_images
from vlprompt.data.images import ImageDataset, OnError, build_eval_transform, collate_skipping, eval_sampler
from vlprompt.data.sources import Sample

__all__ = ["UNLABELLED", "TestImagesDataModule"]

log = logging.getLogger(__name__)

#: Label of an image whose class is unknown.
UNLABELLED = -1


def _scan(root: Path) -> tuple[list[Path], dict[Path, list[Path]]]:
    """The images directly in ``root`` and those of each class folder (searched recursively);
    folders without images are ignored (logged)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    loose = list_images(root, recursive=False)
    folders = {d: list_images(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    empty = [str(d) for d, images in folders.items() if not images]
    folders = {d: images for d, images in folders.items() if images}
    if not loose and not folders:
        raise ValueError(f"{root} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        log.warning("ignoring %d folders without images: %s", len(empty), ", ".join(empty[:5]))
    return loose, folders


def _classnames(root: Path, classnames: list[str] | None, classnames_file: str | None,
                folders: dict[Path, list[Path]]) -> tuple[list[str], dict[str, str]]:
    """The class names (given, from the file, or the class folders) and the class name of each
    folder a ``<folder> <name>`` line names."""
    folder_label: dict[str, str] = {}
    if classnames_file is not None:
        entries = read_classnames_file(classnames_file, [d.name for d in folders])
        classnames = [name for _, name in entries]
        folder_label = {folder: name for folder, name in entries if folder is not None}
    if classnames is None:
        if not folders:
            raise ValueError(
                f"{root} holds unlabelled images only: give the class names "
                "(classnames=[...] or classnames_file with one name per line)"
            )
        classnames = [normalize_classname(d.name) for d in folders]
    classnames = [normalize_classname(c) for c in classnames]
    if not classnames:
        raise ValueError("class names must not be empty")
    check_distinct_classnames(classnames, str(root))
    return classnames, folder_label


class TestImagesDataModule(pl.LightningDataModule):
    """Images to classify, read from ``root``:

    * ``root/<class>/<images>``: the folder names the class (underscores read as spaces,
      case ignored), so accuracy can be measured;
    * images directly in ``root``: unlabelled, classified only.

    Both may be mixed. The class names come from ``classnames`` (or ``classnames_file``: one class
    per line, plain names or ``<folder> <name>`` lines, as for
    :class:`~vlprompt.data.FewShotDataModule`) and must then cover every class folder; without
    them, the class folders are the classes. Implements
    :class:`~vlprompt.data.protocol.ClassificationData`. Unreadable images are skipped, logged and counted (``on_error="skip"``).
    The test and predict loaders serve the same images.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        root: str,
        *,
        classnames: list[str] | None = None,
        classnames_file: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        on_error: OnError = "skip",
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        if classnames is not None and classnames_file is not None:
            raise ValueError("give classnames or classnames_file, not both")
        self.batch_size, self.num_workers, self.on_error = batch_size, num_workers, on_error
        self.samples, self.classnames = self._read(classnames, classnames_file)
        self.preprocess_cfg: dict[str, Any] = dict(DEFAULT_PREPROCESS)
        self.eval_transform: Callable | None = None
        self.datasets: dict[str, ImageDataset] = {}

    def _read(self, classnames: list[str] | None, classnames_file: str | None) -> tuple[list[Sample], list[str]]:
        loose, folders = _scan(self.root)
        classnames, folder_label = _classnames(self.root, classnames, classnames_file, folders)
        label_of = {c.lower(): i for i, c in enumerate(classnames)}
        label_of.update({folder: label_of[name.lower()] for folder, name in folder_label.items()})

        def folder_key(folder: Path) -> str:
            return folder.name if folder.name in folder_label else normalize_classname(folder.name).lower()

        unknown = [d.name for d in folders if folder_key(d) not in label_of]
        if unknown:
            raise ValueError(
                f"class folders {unknown[:10]} in {self.root} match none of the class names {classnames[:10]}; "
                "name each folder after its class (underscores for spaces) or fix the class names"
            )
        samples = [Sample(str(p), UNLABELLED, "") for p in loose]
        for folder, images in folders.items():
            label = label_of[folder_key(folder)]
            samples += [Sample(str(p), label, classnames[label]) for p in images]
        return samples, classnames

    @property
    def labelled(self) -> bool:
        """Whether any image has a known class."""
        return any(s.label != UNLABELLED for s in self.samples)

    # The same hooks as FewShotDataModule, so test-time methods can hand over their views.
    def set_preprocess(self, preprocess_cfg: dict[str, Any]) -> None:
        self.preprocess_cfg = dict(preprocess_cfg)
        self._refresh()

    def set_eval_transform(self, transform: Callable | None) -> None:
        self.eval_transform = transform
        self._refresh()

    @property
    def train_augmentation(self) -> bool:
        """No training here."""
        return False

    def dataset(self, split: str) -> ImageDataset | None:
        """The images, for ``test`` and ``predict``."""
        return self.datasets.get("test") if split in ("test", "predict") else None

    def _refresh(self) -> None:
        if "test" in self.datasets:
            self.datasets["test"].set_transform(*self._transform())

    def _transform(self) -> tuple[Callable, Any]:
        if self.eval_transform is not None:
            return self.eval_transform, {"views": repr(self.eval_transform)}
        return build_eval_transform(self.preprocess_cfg), {"preprocess": self.preprocess_cfg}

    def setup(self, stage: str | None = None) -> None:
        if "test" not in self.datasets:
            transform, key = self._transform()
            self.datasets["test"] = ImageDataset(self.samples, transform, on_error=self.on_error, transform_key=key)
            log.info("%d images in %s, %d classes", len(self.samples), self.root, len(self.classnames))

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return DataLoader(self.datasets["test"], batch_size=self.batch_size, shuffle=False,
                          sampler=eval_sampler(self.datasets["test"]), num_workers=self.num_workers,
                          collate_fn=collate_skipping)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
