"""The ShapeWorld data modules under their historical module path; they live in
:mod:`vlprompt.data.world.datamodules`."""

from vlprompt.data.world.datamodules import (
    ShapeWorldDataModule,
    ShapeWorldPairsDataModule,
    ShapeWorldSegmentationDataModule,
    ensure_shapeworld,
)

__all__ = ["ShapeWorldDataModule", "ShapeWorldPairsDataModule", "ShapeWorldSegmentationDataModule", "ensure_shapeworld"]
