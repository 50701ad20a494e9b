"""An on-disk bank of image features of augmented training views, for learners that leave the
image tower untouched (CoOp, CoCoOp, KgCoOp, DePT ...).

With random augmentation the image tower normally runs on every training step. When each view is
a function of the image and the epoch (``FewShotDataModule(augment_seed=...)``,
:func:`~vlprompt.data.images.view_seed`), the features of the views a run will see can be computed
once, in large no-grad batches, stored, and reused by every method, shot count and few-shot draw of
an evaluation sweep that sees the same image at the same epoch. Training with the bank gives the
same features as encoding each batch's views in the training step: bit for bit in fp32 where the
image tower's kernels round the same whatever the batch size, equal to float32 rounding elsewhere
(other batch shapes may sum in another order); fp16 storage rounds them.

Layout: ``ROOT/<backbone>/<augmentation>/epoch-NNNN/part-*.safetensors``, each part a set of
features named by image content hash; ``<backbone>`` hashes the backbone's identity (weights
fingerprint included) and the storage precision, ``<augmentation>`` the training transform's
description (preprocessing, crop scale, augmentation seed). Parts are only ever added, written
atomically, so concurrent runs and processes can share a bank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset

from vlprompt.data.images import ImageDataset, UnreadableImageError, collate_skipping

__all__ = ["FeatureBank"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:16]


class _ViewsAt(Dataset):
    """``dataset`` as seen at ``epoch``."""

    def __init__(self, dataset: ImageDataset, epoch: int) -> None:
        self.dataset, self.epoch = dataset, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.dataset.item(index, self.epoch)


class FeatureBank:
    """Image features of augmented training views by (backbone, augmentation, epoch, image).

    Args:
        root: the bank's folder (created when needed).
        backbone_identity: the backbone's ``identity`` (its weights fingerprint keys the bank).
        dtype: ``float32`` or ``float16`` (half the disk and memory; rounds the features).
        batch_size: images per no-grad batch when filling the bank.
        num_workers: loader workers when filling the bank (a training run uses its data module's).
    """

    def __init__(
        self,
        root: str | Path,
        backbone_identity: dict[str, Any],
        *,
        dtype: str = "float32",
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"feature bank dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.root = Path(root).expanduser()
        self.dtype = _DTYPES[dtype]
        self.batch_size, self.num_workers = batch_size, num_workers
        self._backbone_key = _digest({"backbone": backbone_identity, "dtype": dtype})
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        #: images run through the image tower by this bank (the rest were found stored)
        self.encoded = 0
        #: indices of the images of the last dataset filled that could not be read
        self.unreadable: set[int] = set()

    def folder(self, dataset: ImageDataset, epoch: int) -> Path:
        """Where the views of ``dataset``'s training transform at ``epoch`` are stored."""
        if dataset.augment_seed is None:
            raise ValueError(
                "a feature bank stores each image's augmented view per epoch, so the views must be "
                "reproducible: set the data module's augment_seed (e.g. --data.augment_seed 0)"
            )
        return self.root / self._backbone_key / _digest(dataset.transform_key) / f"epoch-{epoch:04d}"

    def _stored(self, folder: Path, reload: bool = False) -> dict[str, torch.Tensor]:
        if reload or folder not in self._loaded:
            self._loaded = {folder: self._loaded.get(folder, {})}  # keep only the epoch in use
            for part in sorted(folder.glob("part-*.safetensors")):
                self._loaded[folder].update(load_file(part))
        return self._loaded[folder]

    def fill(
        self,
        dataset: ImageDataset,
        epoch: int,
        encode: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        *,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
    ) -> int:
        """Store the features of every image's view at ``epoch`` not stored yet; with several
        processes each encodes its share (``rank`` of ``world_size``), then all read everything.
        Returns how many images this process ran through the image tower."""
        folder = self.folder(dataset, epoch)
        stored = self._stored(folder, reload=True)
        keys: dict[int, str] = {}
        for index in range(len(dataset)):
            try:
                keys[index] = dataset.content_key(index)
            except UnreadableImageError:
                pass  # a missing file: unreadable below
        missing: dict[str, int] = {}
        for index, key in keys.items():
            if key not in stored and key not in missing:
                missing[key] = index
        mine = sorted(missing.values())[rank::world_size]
        fresh: dict[str, torch.Tensor] = {}
        if mine:
            loader = DataLoader(Subset(_ViewsAt(dataset, epoch), mine), batch_size=self.batch_size,
                                num_workers=self.num_workers, collate_fn=collate_skipping)
            # A loader draws its workers' base seed from the global random state: keep the training
            # run's state (shuffling, initialisation) as if the bank were not there.
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                for batch in loader:
                    if batch["image"] is None:
                        continue
                    features = encode(batch["image"].to(device)).to(self.dtype).cpu()
                    for index, feature in zip(batch["index"].tolist(), features):
                        fresh[dataset.content_key(index)] = feature.contiguous()
            self._write(folder, fresh)
            log.debug("feature bank: encoded %d views of epoch %d (%d were stored)", len(fresh), epoch, len(stored))
        if barrier is not None and world_size > 1:
            barrier()
            stored = self._stored(folder, reload=True)
        stored.update(fresh)
        self.encoded += len(fresh)
        # Images without a stored view now are those no process could read.
        self.unreadable = {index for index in range(len(dataset)) if keys.get(index) not in stored}
        return len(fresh)

    def _write(self, folder: Path, features: dict[str, torch.Tensor]) -> None:
        if not features:
            return
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}.safetensors"
        partial = folder / f".{name}.tmp"
        save_file(features, str(partial))
        os.replace(partial, folder / name)  # readers never see a half-written part

    def features(self, dataset: ImageDataset, epoch: int, indices: Sequence[int]) -> torch.Tensor:
        """Stored features ``[B, D]`` of the views of images ``indices`` at ``epoch``."""
        stored = self._stored(self.folder(dataset, epoch))
        keys = [dataset.content_key(int(i)) for i in indices]
        absent = [int(i) for i, key in zip(indices, keys) if key not in stored]
        if absent:
            raise KeyError(f"feature bank has no view of images {absent[:5]} at epoch {epoch}; fill it first")
        return torch.stack([stored[key] for key in keys])
