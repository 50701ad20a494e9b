"""The tasks of a multitask problem (light: standard library only, so protocols and methods can
name them without loading the data modules)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["RESERVED_TASK_NAMES", "Task", "TaskMetric", "check_task_names"]

TaskMetric = Literal["accuracy", "mean_per_class"]


#: Metric names a multitask classifier logs beside each task's ``<stage>/<task name>`` (the mean
#: over tasks, the unreadable images): a task of one of these names would be overwritten by them.
RESERVED_TASK_NAMES = ("acc", "unreadable_images")


def check_task_names(names: Sequence[str]) -> None:
    """Refuse task names that would mix two tasks' results: a name given twice, an empty name, or a
    name of a metric logged beside the tasks' scores (:data:`RESERVED_TASK_NAMES`)."""
    seen: set[str] = set()
    for name in names:
        key = str(name)  # what the scores are logged under: 1 and "1" are one name there
        if not key.strip():
            raise ValueError(f"task names must not be empty, got {name!r}")
        if key in seen:
            raise ValueError(f"task {name!r} is given twice; give each task its own name")
        if key in RESERVED_TASK_NAMES:
            raise ValueError(f"task name {name!r} is reserved (the multitask scores are logged as <stage>/<task> "
                             f"beside {', '.join(RESERVED_TASK_NAMES)}); rename the task")
        seen.add(key)


@dataclass(frozen=True)
class Task:
    """One task of a multitask problem: its classes are labels ``offset .. offset + num_classes - 1``
    of the union, and its score is ``metric`` (top-1 ``accuracy`` or ``mean_per_class`` accuracy)."""

    name: str
    offset: int
    classnames: tuple[str, ...]
    metric: TaskMetric = "accuracy"

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def labels(self) -> range:
        """The task's labels in the union label space."""
        return range(self.offset, self.offset + self.num_classes)
