"""What every classification format reads into: labelled images by split, with the class names."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Sample", "SplitSamples"]


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: str
    label: int
    classname: str


@dataclass
class SplitSamples:
    """Samples of a dataset by split, with the class names ordered by label."""

    train: list[Sample] = field(default_factory=list)
    val: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r} (train, val, test)")
        return getattr(self, name)
