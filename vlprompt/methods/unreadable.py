"""Accounting of unreadable images: each bad file counted once per stage, over every process, and
logged at the end of the stage."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch

__all__ = ["UnreadableImages", "log_unreadable"]

log = logging.getLogger(__name__)


class UnreadableImages:
    """Unreadable images met per stage, each counted once: by dataset fingerprint and index, so
    a bad file seen again in the next epoch or by the sanity check is not counted twice."""

    def __init__(self) -> None:
        self._seen: dict[str, set[tuple[str, int]]] = {}
        self._uncounted: dict[str, int] = {}

    def add(self, stage: str, fingerprint: str, skipped: list[int] | int) -> None:
        """Record the ``skipped`` entry of a batch: dataset indices (or a bare count from a
        collate function that gives no indices)."""
        if isinstance(skipped, int):
            self._uncounted[stage] = self._uncounted.get(stage, 0) + skipped
            return
        self._seen.setdefault(stage, set()).update((fingerprint, int(i)) for i in skipped)

    def count(self, stage: str) -> int:
        """Distinct unreadable images of ``stage``, over every process."""
        seen = self._seen.get(stage, set())
        extra = self._uncounted.get(stage, 0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (seen, extra))
            seen = set().union(*(s for s, _ in gathered))
            extra = sum(e for _, e in gathered)
        return len(seen) + extra


def log_unreadable(module: pl.LightningModule, unreadable: UnreadableImages, stage: str) -> None:
    """Warn about and log (``<stage>/unreadable_images``) the unreadable images of ``stage``; call
    from an epoch-end hook."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Epoch-end metrics are synced across processes when first computed, which the progress
        # bar does on process 0 only, before this hook. Computing them here on every process
        # puts the gather below after the same collectives everywhere (else they deadlock).
        module.trainer.progress_bar_metrics  # noqa: B018 - computed for its collectives
    count = unreadable.count(stage)
    if count:
        log.warning("%s: %d unreadable images skipped", stage, count)
        module.log(f"{stage}/unreadable_images", float(count), sync_dist=True)
