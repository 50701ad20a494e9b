"""Data: dataset formats, few-shot sampling and the Lightning data modules."""

from vlprompt.data.classnames import check_distinct_classnames, normalize_classname, read_classnames_file
from vlprompt.data.datamodule import DEFAULT_PREPROCESS, FewShotDataModule
from vlprompt.data.multitask import MultiTaskDataModule, MultiTaskDataset, Task, TaskBatchSampler
from vlprompt.data.shapeworld import (
    ShapeWorldDataModule,
    ShapeWorldPairsDataModule,
    ShapeWorldSegmentationDataModule,
    ensure_shapeworld,
)
from vlprompt.data.fewshot import sample_few_shot, subset_classes
from vlprompt.data.images import ImageDataset, build_eval_transform, build_train_transform, collate_skipping
from vlprompt.data.sources import Sample, SplitSamples, read_csv_splits, read_dassl_split, read_imagefolder
from vlprompt.data.pairs import ImageTextPairs, ImageTextPairsDataModule
from vlprompt.data.protocol import ClassificationData
from vlprompt.data.test_images import TestImagesDataModule
from vlprompt.data.segmentation import (
    VOC_CLASSNAMES,
    SegmentationDataModule,
    SegmentationDataset,
    SegmentationSample,
    collate_segmentation,
    read_tunevlseg,
    read_voc,
)

__all__ = [
    "ClassificationData",
    "DEFAULT_PREPROCESS",
    "FewShotDataModule",
    "ImageDataset",
    "ImageTextPairs",
    "ImageTextPairsDataModule",
    "MultiTaskDataModule",
    "MultiTaskDataset",
    "Sample",
    "ShapeWorldDataModule",
    "ShapeWorldPairsDataModule",
    "ShapeWorldSegmentationDataModule",
    "SplitSamples",
    "Task",
    "TaskBatchSampler",
    "TestImagesDataModule",
    "build_eval_transform",
    "build_train_transform",
    "check_distinct_classnames",
    "collate_skipping",
    "ensure_shapeworld",
    "normalize_classname",
    "read_classnames_file",
    "read_csv_splits",
    "read_dassl_split",
    "read_imagefolder",
    "sample_few_shot",
    "subset_classes",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SegmentationSample",
    "VOC_CLASSNAMES",
    "collate_segmentation",
    "read_tunevlseg",
    "read_voc",
]
