"""The ShapeWorld data modules: the world's tasks as few-shot classification, referring
segmentation and image-caption data, generated on first use."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlprompt.data.datamodule import FewShotDataModule
from vlprompt.data.pairs import ImageTextPairsDataModule
from vlprompt.data.segmentation.datamodule import SegmentationDataModule
from vlprompt.data.world.attributes import SPLIT_FILE, Domain
from vlprompt.data.world.writers import write_caption_dataset, write_classification_dataset, write_segmentation_dataset

__all__ = ["ShapeWorldDataModule", "ShapeWorldPairsDataModule", "ShapeWorldSegmentationDataModule", "ensure_shapeworld"]

log = logging.getLogger(__name__)

_MARKER = "shapeworld.json"


def ensure_shapeworld(root: str | Path, *, domain: Domain = "negative", seed: int = 0, task: str = "pairs") -> Path:
    """Write the ShapeWorld classification dataset of ``task`` (:data:`~vlprompt.data.world.TASKS`),
    the referring-segmentation dataset (``task="segmentation"``) or unlabelled image-caption pairs
    (``task="captions"``, pretraining-domain images), into ``root`` unless it is already there.

    Generation is deterministic, so a folder written earlier with the same settings is reused; a
    folder written with other settings is an error rather than a silent mix-up.
    """
    root = Path(root).expanduser()
    settings: dict[str, object] = {"domain": domain, "seed": seed}
    if task != "pairs":  # folders of the held-out pairs written before tasks existed stay valid
        settings["task"] = task
    marker = root / _MARKER
    done = root / {"segmentation": "anns/train.json", "captions": _MARKER}.get(task, SPLIT_FILE)
    if done.is_file():
        found = json.loads(marker.read_text()) if marker.is_file() else None
        if found != settings:
            raise ValueError(
                f"{root} holds a ShapeWorld dataset made with {found}, not {settings}; "
                "pass another root (each task and domain needs its own folder)"
            )
        return root
    log.info("generating the ShapeWorld %s %s dataset in %s (once)", task, domain, root)
    if task == "segmentation":
        write_segmentation_dataset(root, seed=seed, domain=domain)
    elif task == "captions":
        write_caption_dataset(root, seed=seed)
    else:
        write_classification_dataset(root, seed=seed, domain=domain, task=task)
    marker.write_text(json.dumps(settings) + "\n")
    return root


class ShapeWorldDataModule(FewShotDataModule):
    """Few-shot data over a ShapeWorld task, generated on first use: by default the 16 held-out
    (colour, shape) classes. Other arguments as for :class:`~vlprompt.data.FewShotDataModule`.

    Args:
        root: where the dataset is (or will be) written; default ``outputs/shapeworld-<domain>``
            (``outputs/shapeworld-<task>-<domain>`` for the attribute tasks).
        domain: ``negative`` (photographic negatives: the demo's task, where the hand-written
            prompt is wrong about the images and a learned one can fix it), ``clean`` (positives
            on a new backdrop) or ``shifted`` (harder backgrounds and lighting, for test-time
            adaptation).
        task: ``pairs`` (the held-out classes) or an attribute: ``colour``, ``shape``, ``texture``,
            ``size``, ``position`` (:data:`~vlprompt.data.world.TASKS`; attribute images never
            show a held-out pair).
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        domain: Domain = "negative",
        task: str = "pairs",
        crop_scale: tuple[float, float] = (0.5, 1.0),  # objects are small: keep most of the frame
        **kwargs: Any,
    ) -> None:
        # crop_scale is in the signature (not a setdefault on kwargs) because jsonargparse passes
        # every FewShotDataModule default explicitly through **kwargs.
        root = root or (f"outputs/shapeworld-{domain}" if task == "pairs" else f"outputs/shapeworld-{task}-{domain}")
        ensure_shapeworld(root, domain=domain, task=task)
        self.task = task
        super().__init__(root, format="dassl", crop_scale=crop_scale, **kwargs)


class ShapeWorldSegmentationDataModule(SegmentationDataModule):
    """Referring segmentation on ShapeWorld, generated on first use: two held-out (colour, shape)
    objects per image, one mask and prompts (``"red star"``, a description) per object
    (:func:`~vlprompt.data.write_segmentation_dataset`). Other arguments as for
    :class:`~vlprompt.data.segmentation.SegmentationDataModule`.

    Args:
        root: where the dataset is (or will be) written; default ``outputs/shapeworld-seg-<domain>``.
        domain: ``clean``, ``negative`` or ``shifted``.
    """

    def __init__(self, root: str | None = None, *, domain: Domain = "clean", **kwargs: Any) -> None:
        root = root or f"outputs/shapeworld-seg-{domain}"
        ensure_shapeworld(root, domain=domain, task="segmentation")
        super().__init__(root, format="tunevlseg", **kwargs)


class ShapeWorldPairsDataModule(ImageTextPairsDataModule):
    """Unlabelled ShapeWorld image-caption pairs for meta-learning (GRAM), generated on first use
    (:func:`~vlprompt.data.write_caption_dataset`: 2,048 pretraining-domain images and their
    captions, no class labels). Other arguments as for
    :class:`~vlprompt.data.pairs.ImageTextPairsDataModule`.

    Args:
        root: where the pairs are (or will be) written; default ``outputs/shapeworld-captions``.
    """

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        root = root or "outputs/shapeworld-captions"
        ensure_shapeworld(root, domain="pretrain", task="captions")
        super().__init__(root, **kwargs)
