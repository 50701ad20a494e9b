"""``MultiTaskDataModule``: several classification tasks as one, for multitask prompt tuning
(MVLPT, Shen et al., WACV 2024).

Each task is any classification data module of vlprompt (a dataset descriptor, a Dassl split,
an ImageFolder or CSV, ShapeWorld) with its own shots and seed. Labels are offset into one union
label space, task after task; the class names of all tasks are concatenated, so a name that two
tasks share stays two classes. Every sample carries its task id.

Training batches are drawn in one of three ways (``sampling``):

* ``mixed``: the union shuffled as one dataset, so each task fills batches in proportion to its
  size on average (what MVLPT does);
* ``proportional``: every batch holds the tasks in proportion to their sizes (stratified, less
  variance than ``mixed``);
* ``round_robin``: batches come from one task at a time, tasks taking turns; when a task runs out
  mid-batch the batch is filled from the next one.

All three visit every training sample once per epoch and give the same number of batches, and
they shard correctly under DDP (Lightning hands the batch sampler its distributed sampler).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from vlprompt.data.images import STAGE_SPLITS, ImageDataset, collate_skipping, drops_last_batch, eval_sampler
from vlprompt.data.protocol import ClassificationData
from vlprompt.data.tasks import RESERVED_TASK_NAMES, Task, TaskMetric, check_task_names

__all__ = ["RESERVED_TASK_NAMES", "MultiTaskDataModule", "MultiTaskDataset", "Task", "TaskBatchSampler", "TaskMetric",
           "TaskSampling", "check_task_names"]

log = logging.getLogger(__name__)

TaskSampling = Literal["mixed", "proportional", "round_robin"]


class MultiTaskDataset(Dataset):
    """The datasets of several tasks concatenated: item ``i`` is item ``i - start[t]`` of task
    ``t``, with its label offset by the task's offset, ``task`` set to ``t`` and ``index`` to ``i``
    (the key of cached image features)."""

    def __init__(self, parts: Sequence[ImageDataset], offsets: Sequence[int]) -> None:
        if len(parts) != len(offsets):
            raise ValueError(f"{len(parts)} datasets but {len(offsets)} label offsets")
        self.parts, self.offsets = list(parts), list(offsets)
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """``(task, index within the task's dataset)`` of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        task = bisect.bisect_right(self.starts, index) - 1
        return task, index - self.starts[task]

    @property
    def task_of(self) -> list[int]:
        """The task of every item, in order."""
        return [t for t, part in enumerate(self.parts) for _ in range(len(part))]

    @property
    def fingerprint(self) -> str:
        """Identity of what this dataset yields: its parts' fingerprints and label offsets."""
        key = "|".join(f"{part.fingerprint}+{offset}" for part, offset in zip(self.parts, self.offsets))
        return hashlib.sha256(key.encode()).hexdigest()[:20]

    def __getitem__(self, index: int) -> dict[str, Any]:
        task, local = self.locate(index)
        item = self.parts[task][local]
        if "unreadable" in item:
            return {"unreadable": index}
        return {**item, "label": item["label"] + self.offsets[task], "index": index, "task": task}


class TaskBatchSampler(BatchSampler):
    """Batches of a :class:`MultiTaskDataset` that hold its tasks ``proportional``-ly or come from
    one task at a time (``round_robin``).

    The indices come from ``sampler`` (a shuffling sampler; under DDP Lightning swaps in its
    distributed sampler, which keeps this class's other arguments), so randomness, sharding and
    the number of batches (``ceil(len(sampler) / batch_size)``, or the floor with ``drop_last``)
    are those of a plain shuffled :class:`~torch.utils.data.BatchSampler`.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        *,
        task_of: Sequence[int],
        mode: Literal["proportional", "round_robin"] = "proportional",
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if mode not in ("proportional", "round_robin"):
            raise ValueError(f"mode must be proportional or round_robin, not {mode!r}")
        self.task_of, self.mode = list(task_of), mode

    def _order(self, indices: list[int]) -> list[int]:
        by_task: dict[int, list[int]] = {}
        for i in indices:
            by_task.setdefault(self.task_of[i], []).append(i)
        queues = [by_task[t] for t in sorted(by_task)]
        if self.mode == "proportional":
            # Spread each task's samples evenly over the epoch (sample j of n at (j + 0.5) / n);
            # consecutive batches then hold every task in proportion to its size.
            placed = sorted((
                (j + 0.5) / len(queue), t, i) for t, queue in enumerate(queues) for j, i in enumerate(queue))
            return [i for _, _, i in placed]
        order: list[int] = []
        position = [0] * len(queues)
        while len(order) < len(indices):
            for t, queue in enumerate(queues):
                order += queue[position[t]:position[t] + self.batch_size]
                position[t] += self.batch_size
        return order

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order(list(self.sampler))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch


class MultiTaskDataModule(pl.LightningDataModule):
    """Several classification tasks as one data module (see the module docstring).

    Implements :class:`~vlprompt.data.protocol.ClassificationData` over the union of classes; its
    :attr:`tasks` tell a multitask method which labels belong to which task and how each task is
    scored.

    Args:
        tasks: task name -> data module (e.g. :class:`~vlprompt.data.FewShotDataModule` or
            :class:`~vlprompt.data.ShapeWorldDataModule`, each with its own shots and seed), or a
            list of (name, data module) pairs; names must be unique (:func:`check_task_names`).
            Order matters: it fixes the label offsets.
        metrics: task name -> ``accuracy`` or ``mean_per_class``; default: the task's data module's
            ``metric`` (a dataset descriptor's), else ``accuracy``.
        sampling: ``mixed``, ``proportional`` or ``round_robin`` training batches.
        batch_size, eval_batch_size, num_workers: loaders over the union.
        drop_last: drop an incomplete last training batch (when a full one remains, as Dassl's loader;
            a method can ask for it too, see :class:`~vlprompt.data.protocol.TrainBatches`).
    """

    def __init__(
        self,
        tasks: Mapping[str, pl.LightningDataModule],
        *,
        metrics: Mapping[str, TaskMetric] | None = None,
        sampling: TaskSampling = "mixed",
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 2,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        # A list of (name, data module) pairs is accepted too; dict() would keep the last of two
        # tasks of one name silently, and report its scores under the name of both.
        pairs = list(tasks.items() if isinstance(tasks, Mapping) else tasks)
        if not pairs:
            raise ValueError("MultiTaskDataModule needs at least one task")
        check_task_names([name for name, _ in pairs])
        if sampling not in ("mixed", "proportional", "round_robin"):
            raise ValueError(f"sampling must be mixed, proportional or round_robin, not {sampling!r}")
        metrics = dict(metrics or {})
        unknown = sorted(set(metrics) - {name for name, _ in pairs})
        if unknown:
            raise ValueError(f"metrics given for tasks that do not exist: {unknown}; tasks: {[n for n, _ in pairs]}")
        self.modules: dict[str, pl.LightningDataModule] = dict(pairs)
        self.tasks: list[Task] = []
        offset = 0
        for name, dm in self.modules.items():
            if not isinstance(dm, ClassificationData):
                raise TypeError(f"task {name!r}: {type(dm).__name__} is not a vlprompt classification data module")
            names = tuple(dm.classnames)
            if not names:
                raise ValueError(f"task {name!r} has no classes")
            metric = metrics.get(name) or getattr(dm, "metric", None) or "accuracy"
            if metric not in ("accuracy", "mean_per_class"):
                raise ValueError(f"task {name!r}: metric must be accuracy or mean_per_class, not {metric!r}")
            self.tasks.append(Task(name, offset, names, metric))
            offset += len(names)
        self.sampling = sampling
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.drop_last = drop_last
        self.method_drop_last = False
        self.datasets: dict[str, MultiTaskDataset] = {}

    def request_drop_last(self, drop: bool) -> None:
        """The fitted method's wish to drop the last incomplete training batch
        (:class:`~vlprompt.data.protocol.TrainBatches`), renewed at every fit."""
        self.method_drop_last = drop

    # -- the ClassificationData protocol -----------------------------------------------------------
    @property
    def classnames(self) -> list[str]:
        """The class names of every task, task after task (label order of the union)."""
        return [name for task in self.tasks for name in task.classnames]

    def set_preprocess(self, preprocess_cfg: dict[str, Any]) -> None:
        for dm in self.modules.values():
            dm.set_preprocess(preprocess_cfg)

    def set_eval_transform(self, transform: Callable | None) -> None:
        for dm in self.modules.values():
            dm.set_eval_transform(transform)

    @property
    def train_augmentation(self) -> bool:
        return any(dm.train_augmentation for dm in self.modules.values())

    def dataset(self, split: str) -> MultiTaskDataset | None:
        return self.datasets.get("test" if split == "predict" else split)

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        splits = [s for s in STAGE_SPLITS.get(stage, ("train", "val", "test")) if s not in self.datasets]
        if splits:
            for dm in self.modules.values():
                dm.setup(stage)
        for split in splits:
            parts = []
            for name, dm in self.modules.items():
                part = dm.dataset(split)
                if part is None and split == "train":
                    raise ValueError(f"task {name!r} has no training data")
                parts.append(part if part is not None else ImageDataset([]))
            if split == "val" and not any(len(p) for p in parts):
                continue
            missing = [t.name for t, p in zip(self.tasks, parts) if not len(p)]
            if missing:
                log.warning("%s split: no images for tasks %s; they are not scored", split, ", ".join(missing))
            self.datasets[split] = MultiTaskDataset(parts, [t.offset for t in self.tasks])
            log.info("%s: %d images over %d tasks (%s)", split, len(self.datasets[split]), len(self.tasks),
                     ", ".join(f"{t.name} {len(p)}" for t, p in zip(self.tasks, parts)))

    def _loader(self, dataset: MultiTaskDataset, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, collate_fn=collate_skipping,
                          persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            self.setup("fit")
        dataset = self.datasets["train"]
        drop = (self.drop_last or self.method_drop_last) and drops_last_batch(len(dataset), self.batch_size)
        if self.sampling == "mixed":
            return self._loader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=drop)
        sampler = TaskBatchSampler(RandomSampler(dataset), self.batch_size, drop,
                                   task_of=dataset.task_of, mode=self.sampling)
        return self._loader(dataset, batch_sampler=sampler)

    def _eval_loader(self, split: str) -> DataLoader | list:
        if split not in self.datasets:
            self.setup({"val": "validate"}.get(split, "test"))
        if split not in self.datasets:
            return []
        dataset = self.datasets[split]
        return self._loader(dataset, batch_size=self.eval_batch_size, sampler=eval_sampler(dataset))

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def task_sizes(self, split: str = "train") -> dict[str, int]:
        """Images per task in ``split`` (after set-up)."""
        dataset = self.datasets[split]
        return {t.name: len(p) for t, p in zip(self.tasks, dataset.parts)}

