"""Image datasets that survive bad files, and the transforms handed over by the backbone."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision.transforms import v2 as T

from vlprompt.data.files import UnreadableImageError
from vlprompt.data.samples import Sample

__all__ = [
    "DEFAULT_PREPROCESS",
    "STAGE_SPLITS",
    "EvalDistributedSampler",
    "ImageDataset",
    "OnError",
    "SplitLoaders",
    "UnreadableImageError",
    "build_eval_transform",
    "build_train_transform",
    "collate_skipping",
    "drops_last_batch",
    "eval_sampler",
    "load_rgb",
]

log = logging.getLogger(__name__)

OnError = Literal["skip", "raise"]

#: OpenAI CLIP's preprocessing, used until a backbone hands over its own.
DEFAULT_PREPROCESS: dict[str, Any] = {
    "size": 224,
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows it: 16-bit and 32-bit images are scaled to 8 bits (PIL's
    ``convert("RGB")`` clips them to white), and transparent images are composited on white
    (``convert`` drops the alpha channel, so content drawn in alpha turns black)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            values = values * 255.0 if values.size and values.max() <= 1.0 else values
        elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
            values = values / 257.0  # 16-bit to 8-bit
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | io.BytesIO, name: str | None = None) -> Image.Image:
    """Open an image (a path, or its bytes and a ``name`` for messages) as 8-bit RGB (see
    :func:`to_rgb`), turning every decoding failure into one clear error."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {name or path}: {err}") from err


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


def _content_key(data: bytes) -> str:
    """An image's content key: a hash of its file's bytes."""
    return hashlib.sha256(data).hexdigest()[:32]


def view_seed(augment_seed: int, content_key: str, epoch: int) -> int:
    """The seed of an image's random augmentation at ``epoch``: a function of the image's content,
    not of its place in a dataset, so the same image gets the same view in every subset of the
    data (every shot count and few-shot draw of a sweep)."""
    digest = hashlib.sha256(f"{augment_seed}:{content_key}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ImageDataset(Dataset):
    """Labelled images read from disk.

    With ``on_error="skip"`` an unreadable image yields ``{"unreadable": index}``;
    :func:`collate_skipping` drops it from the batch and lists its index under ``"skipped"`` so the
    method counts each bad file once. Items are dicts with ``image``, ``label`` and ``index``
    (position in this dataset, the key of cached image features).

    Args:
        samples: the images and labels.
        transform: image -> tensor.
        on_error: ``skip`` or ``raise`` on unreadable files.
        transform_key: a description of what ``transform`` does (e.g. the preprocessing config);
            part of :attr:`fingerprint`. Set it with :meth:`set_transform`.
        augment_seed: when set, a random ``transform`` draws each image's view at epoch ``e`` from
            :func:`view_seed` (``augment_seed``, the image's content, ``e``) instead of the global
            random state: the same views whatever the loader workers, shuffling or subset, which is
            what lets a feature bank store them (:class:`~vlprompt.methods.feature_bank.FeatureBank`).
            The epoch is set with :meth:`set_epoch` and shared with loader worker processes.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable | None = None,
        on_error: OnError = "skip",
        transform_key: Any = None,
        augment_seed: int | None = None,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        self.samples = list(samples)
        self.on_error = on_error
        self.transform, self.transform_key = transform, transform_key
        self.augment_seed = augment_seed
        # Shared with loader worker processes, which read them for every item.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._labels_only = torch.zeros((), dtype=torch.bool).share_memory_()
        self._content_keys: dict[int, str] = {}
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(f"{sample.path}\0{sample.label}\n".encode())
        self._samples_digest = digest.hexdigest()

    def set_transform(self, transform: Callable | None, transform_key: Any) -> None:
        """Replace the transform and the description that goes into :attr:`fingerprint`."""
        self.transform, self.transform_key = transform, transform_key

    @property
    def fingerprint(self) -> str:
        """Identity of what this dataset yields: a hash of its sample list (paths and labels, in
        order) and of its preprocessing. Two datasets with the same class names but other images
        (ImageNet and ImageNet-V2) differ; the same data read twice is the same."""
        key = json.dumps(self.transform_key, sort_keys=True, default=repr)
        return hashlib.sha256(f"{self._samples_digest}|{key}".encode()).hexdigest()[:20]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose views :meth:`__getitem__` yields (with ``augment_seed``)."""
        self._epoch.fill_(epoch)

    @property
    def labels_only(self) -> bool:
        return bool(self._labels_only)

    def set_labels_only(self, labels_only: bool) -> None:
        """Yield labels and indices without reading the images (an empty ``image``), for training
        whose image features come from a feature bank."""
        self._labels_only.fill_(labels_only)

    def content_key(self, index: int) -> str:
        """Hash of the bytes of image ``index`` (read once, then remembered)."""
        if index not in self._content_keys:
            self._content_keys[index] = _content_key(_read_bytes(self.samples[index].path))
        return self._content_keys[index]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if self.labels_only:
            return {"image": torch.zeros(0), "label": self.samples[index].label, "index": index}
        return self.item(index, self.epoch)

    def item(self, index: int, epoch: int) -> dict[str, Any] | None:
        """Item ``index`` as seen at ``epoch`` (the epoch matters only with ``augment_seed``)."""
        sample = self.samples[index]
        try:
            if self.augment_seed is None:
                image = load_rgb(sample.path)
            else:  # the bytes are read once, for the image and (first time only) its content key
                data = _read_bytes(sample.path)
                image = load_rgb(io.BytesIO(data), name=sample.path)
                if index not in self._content_keys:
                    self._content_keys[index] = _content_key(data)
        except UnreadableImageError as err:
            if self.on_error == "raise":
                raise
            log.warning("skipping %s", err)
            return {"unreadable": index}
        if self.transform is not None:
            if self.augment_seed is None:
                image = self.transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(view_seed(self.augment_seed, self._content_keys[index], epoch))
                    image = self.transform(image)
        item = {"image": image, "label": sample.label, "index": index}
        if self.augment_seed is not None:
            item["epoch"] = epoch  # which epoch's view: see remake_stale
        return item

    def remake_stale(self, batch: dict[str, Any], epoch: int) -> int:
        """See :func:`remake_stale`."""
        return remake_stale(batch, epoch, self.item, collate_skipping)


def remake_stale(batch: dict[str, Any], epoch: int, item: Callable[[int, int], dict[str, Any]],
                 collate: Callable[[list], dict[str, Any]]) -> int:
    """Remake, in place, a collated training ``batch`` whose random draws were made for another
    epoch than ``epoch`` (items of seeded datasets say which, under ``epoch``), with ``item(index,
    epoch)`` and ``collate``; returns how many items were stale.

    Loader workers read the epoch when they fetch. Lightning starts the first epoch's loader (and
    its workers start fetching) before any epoch hook, also before restoring the loop when resuming
    from a checkpoint, so the first batches of a resumed run can hold epoch 0's draws instead of
    the resumed epoch's."""
    made_for = batch.get("epoch")
    if made_for is None or batch.get("image") is None or bool((made_for == epoch).all()):
        return 0
    fresh = collate([item(index, epoch) for index in batch["index"].tolist()])
    device = batch["image"].device
    stale = int((made_for != epoch).sum())
    skipped = batch["skipped"] + fresh.pop("skipped")
    batch.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fresh.items()})
    batch["skipped"] = skipped
    return stale


def collate_skipping(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate, dropping the items of unreadable images; ``batch["skipped"]`` lists their dataset
    indices (empty when none)."""
    kept = [it for it in items if "unreadable" not in it]
    skipped = [int(it["unreadable"]) for it in items if "unreadable" in it]
    if not kept:
        return {"image": None, "label": None, "index": None, "skipped": skipped}
    batch = default_collate(kept)
    batch["skipped"] = skipped
    return batch


def build_eval_transform(preprocess_cfg: dict[str, Any]) -> Callable:
    """The backbone's own evaluation preprocessing (open_clip's, from its preprocess config)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    fields = {k: v for k, v in preprocess_cfg.items() if k in PreprocessCfg.__dataclass_fields__}
    return image_transform_v2(PreprocessCfg(**fields), is_train=False)


def build_train_transform(
    preprocess_cfg: dict[str, Any],
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> Callable:
    """Random resized crop and horizontal flip (CoOp's augmentation; TPT's views), then the
    backbone's normalisation (TPT's AugMix is :mod:`vlprompt.tta.augmix`)."""
    size = preprocess_cfg.get("size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    interpolation = _INTERPOLATION.get(preprocess_cfg.get("interpolation", "bicubic"), T.InterpolationMode.BICUBIC)
    steps: list[Callable] = [T.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(preprocess_cfg["mean"]), std=list(preprocess_cfg["std"])),
    ]
    return T.Compose(steps)


class EvalDistributedSampler(DistributedSampler):
    """Splits an evaluation set over processes without padding or duplicates (rank ``r`` gets
    items ``r, r + n, r + 2n, ...``), so metrics summed over processes count every image once.
    Lightning leaves loaders whose sampler is already a ``DistributedSampler`` alone."""

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def eval_sampler(dataset: Dataset) -> EvalDistributedSampler | None:
    """An :class:`EvalDistributedSampler` when running in several processes, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return EvalDistributedSampler(dataset)
    return None


def drops_last_batch(n_items: int, batch_size: int) -> bool:
    """Whether a training loader asked to drop its last incomplete batch does: as Dassl's
    ``build_data_loader``, only when at least one full batch remains (a training set smaller than
    a batch is kept whole rather than leaving an epoch with nothing)."""
    return n_items >= batch_size


#: The splits each Lightning stage reads (``None``: all of them).
STAGE_SPLITS: dict[str, tuple[str, ...]] = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                                            "predict": ("test",)}


class SplitLoaders:
    """Set-up and loaders of a data module with train/val/test splits: :meth:`setup` builds
    ``self.datasets[split]`` from ``split_samples(split)`` through ``build_dataset(split,
    samples)`` (an empty validation split is skipped, another empty split is an error); training
    batches are shuffled, evaluation is split over processes without padding
    (:class:`EvalDistributedSampler`), ``predict`` reads the test split. Needs ``batch_size``,
    ``eval_batch_size``, ``num_workers`` and ``root``; subclasses set :attr:`collate_fn`."""

    collate_fn: Callable = staticmethod(collate_skipping)
    #: Set up found no validation samples: fit runs without validation.
    no_val_split: bool = False
    #: Drop the last incomplete training batch (the data module's own setting) ...
    drop_last: bool = False
    #: ... or because the method being fitted asks for it (:meth:`request_drop_last`).
    method_drop_last: bool = False

    def request_drop_last(self, drop: bool) -> None:
        """The fitted method's wish (:class:`~vlprompt.data.protocol.TrainBatches`), renewed at
        every fit so that it does not outlive the method."""
        self.method_drop_last = drop

    def build_dataset(self, split: str, samples: list) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        for split in STAGE_SPLITS.get(stage, ("train", "val", "test")):
            if split in self.datasets or (split == "val" and self.no_val_split):
                continue
            samples = self.split_samples(split)
            if not samples and split == "val":
                # Normal for segmentation data (TuneVLSeg's test-only sets, VOC without split
                # files; their readers name a missing split file), so not announced on every run.
                # Remembered: the validation loader then neither sets up again nor repeats it.
                self.no_val_split = True
                log.debug("%s: no validation samples; fit runs without validation", self.root)
                continue
            if not samples:
                raise ValueError(f"the {split} split of {self.root} is empty" + self._empty_hint())
            self.datasets[split] = self.build_dataset(split, samples)

    def _empty_hint(self) -> str:
        return ""

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(split, "test"))
        dataset = self.datasets[split]
        drop = train and (self.drop_last or self.method_drop_last) and drops_last_batch(len(dataset), self.batch_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=drop,
            sampler=None if train else eval_sampler(dataset),
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", train=True)
        # Lightning starts the first epoch's loader before any epoch hook: the random draws of a
        # seeded dataset must already be the current epoch's. (When resuming, the loop's epoch is
        # restored later still; the model remakes batches drawn for another epoch, remake_stale.)
        trainer = getattr(self, "trainer", None)
        if hasattr(self.datasets["train"], "set_epoch"):
            self.datasets["train"].set_epoch(trainer.current_epoch if trainer is not None else 0)
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets and not self.no_val_split:
            self.setup("validate")
        return self._loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
