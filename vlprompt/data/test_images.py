"""``TestImagesDataModule``: a user's own folder of images to classify at test time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from vlprompt.data.datamodule import DEFAULT_PREPROCESS
from vlprompt.data.images import ImageDataset, OnError, build_eval_transform, collate_skipping
from vlprompt.data.sources import IMAGE_EXTENSIONS, Sample

__all__ = ["UNLABELLED", "TestImagesDataModule", "read_classnames_file"]

log = logging.getLogger(__name__)

#: Label of an image whose class is unknown.
UNLABELLED = -1


def read_classnames_file(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ValueError(f"{path} lists no class names (one per line expected)")
    return names


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class TestImagesDataModule(pl.LightningDataModule):
    """Images to classify, read from ``root``:

    * ``root/<class>/<images>``: the folder names the class (underscores read as spaces,
      case ignored), so accuracy can be measured;
    * images directly in ``root``: unlabelled, classified only.

    Both may be mixed. The class names come from ``classnames`` (or ``classnames_file``, one per
    line) and must then cover every class folder; without them, the class folders are the
    classes. Unreadable images are skipped, logged and counted (``on_error="skip"``).
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
        if classnames_file is not None:
            classnames = read_classnames_file(classnames_file)
        self.batch_size, self.num_workers, self.on_error = batch_size, num_workers, on_error
        self.samples, self.classnames = self._read(classnames)
        self.preprocess_cfg: dict[str, Any] = dict(DEFAULT_PREPROCESS)
        self.eval_transform: Callable | None = None
        self.datasets: dict[str, ImageDataset] = {}

    def _read(self, classnames: list[str] | None) -> tuple[list[Sample], list[str]]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        loose = _images_in(self.root, recursive=False)
        folders = {d: _images_in(d, recursive=True) for d in sorted(self.root.iterdir())
                   if d.is_dir() and not d.name.startswith(".")}
        empty = [str(d) for d, images in folders.items() if not images]
        folders = {d: images for d, images in folders.items() if images}
        if not loose and not folders:
            raise ValueError(f"{self.root} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        if empty:
            log.warning("ignoring %d folders without images: %s", len(empty), ", ".join(empty[:5]))
        if classnames is None:
            if not folders:
                raise ValueError(
                    f"{self.root} holds unlabelled images only: give the class names "
                    "(classnames=[...] or classnames_file with one name per line)"
                )
            classnames = [d.name.replace("_", " ") for d in folders]
        if not classnames or len(set(c.lower() for c in classnames)) != len(classnames):
            raise ValueError(f"class names must be non-empty and distinct, got {classnames}")
        label_of = {c.lower(): i for i, c in enumerate(classnames)}
        unknown = [d.name for d in folders if d.name.replace("_", " ").lower() not in label_of]
        if unknown:
            raise ValueError(
                f"class folders {unknown[:10]} in {self.root} match none of the class names {classnames[:10]}; "
                "name each folder after its class (underscores for spaces) or fix the class names"
            )
        samples = [Sample(str(p), UNLABELLED, "") for p in loose]
        for folder, images in folders.items():
            label = label_of[folder.name.replace("_", " ").lower()]
            samples += [Sample(str(p), label, classnames[label]) for p in images]
        return samples, list(classnames)

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

    def _refresh(self) -> None:
        if "test" in self.datasets:
            self.datasets["test"].transform = self._transform()

    def _transform(self) -> Callable:
        return self.eval_transform or build_eval_transform(self.preprocess_cfg)

    def setup(self, stage: str | None = None) -> None:
        if "test" not in self.datasets:
            self.datasets["test"] = ImageDataset(self.samples, self._transform(), on_error=self.on_error,
                                                 cache_key=f"images:{self.root}")
            log.info("%d images in %s, %d classes", len(self.samples), self.root, len(self.classnames))

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return DataLoader(self.datasets["test"], batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_skipping)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
