"""``ShapeWorldDataModule``: the embedded world's held-out classes as a few-shot dataset."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlprompt.data import FewShotDataModule
from vlprompt.zoo import world

__all__ = ["ShapeWorldDataModule", "ensure_shapeworld"]

log = logging.getLogger(__name__)


def ensure_shapeworld(root: str | Path, *, domain: world.Domain = "clean", seed: int = 0) -> Path:
    """Write the ShapeWorld classification dataset into ``root`` unless it is already there.

    Generation is deterministic, so a folder written earlier with the same settings is reused.
    """
    root = Path(root).expanduser()
    if (root / world.SPLIT_FILE).is_file():
        return root
    log.info("generating the ShapeWorld %s dataset in %s (once)", domain, root)
    return world.write_classification_dataset(root, seed=seed, domain=domain)


class ShapeWorldDataModule(FewShotDataModule):
    """Few-shot data over the 16 held-out (colour, shape) classes of ShapeWorld, generated into
    ``root`` on first use. Other arguments as for :class:`~vlprompt.data.FewShotDataModule`.

    Args:
        root: where the dataset is (or will be) written.
        domain: ``clean`` (the usual downstream images) or ``shifted`` (harder backgrounds and
            lighting, for domain-shift and test-time adaptation experiments).
    """

    def __init__(self, root: str = "outputs/shapeworld", *, domain: world.Domain = "clean", **kwargs: Any) -> None:
        ensure_shapeworld(root, domain=domain)
        kwargs.setdefault("crop_scale", (0.5, 1.0))  # objects are small: keep most of the frame
        super().__init__(root, format="dassl", **kwargs)
