"""Data: dataset formats, few-shot sampling and the Lightning data modules.

Layout: ``formats/`` (the format registry and one reader module per format), ``files`` (listing
images), ``samples`` / ``images`` / ``pairs`` (samples and datasets), ``datamodule`` /
``test_images`` / ``multitask`` / ``segmentation/`` (data modules), ``catalog`` (standard
benchmark descriptors) and ``world/`` (the procedural ShapeWorld). Names below are imported on
first use, so ``import vlprompt.data`` stays light.
"""

from vlprompt.data.lazy import lazy_exports

_EXPORTS = {
    "check_distinct_classnames": "vlprompt.data.classnames",
    "normalize_classname": "vlprompt.data.classnames",
    "read_classnames_file": "vlprompt.data.classnames",
    "DEFAULT_PREPROCESS": "vlprompt.data.images",
    "FewShotDataModule": "vlprompt.data.datamodule",
    "MultiTaskDataModule": "vlprompt.data.multitask",
    "MultiTaskDataset": "vlprompt.data.multitask",
    "Task": "vlprompt.data.multitask",
    "TaskBatchSampler": "vlprompt.data.multitask",
    "ShapeWorldDataModule": "vlprompt.data.world.datamodules",
    "ShapeWorldPairsDataModule": "vlprompt.data.world.datamodules",
    "ShapeWorldSegmentationDataModule": "vlprompt.data.world.datamodules",
    "ensure_shapeworld": "vlprompt.data.world.datamodules",
    "sample_few_shot": "vlprompt.data.fewshot",
    "subset_classes": "vlprompt.data.fewshot",
    "ImageDataset": "vlprompt.data.images",
    "build_eval_transform": "vlprompt.data.images",
    "build_train_transform": "vlprompt.data.images",
    "collate_skipping": "vlprompt.data.images",
    "IMAGE_EXTENSIONS": "vlprompt.data.files",
    "list_images": "vlprompt.data.files",
    "Sample": "vlprompt.data.samples",
    "SplitSamples": "vlprompt.data.samples",
    "read_csv_splits": "vlprompt.data.formats.csv_splits",
    "read_dassl_split": "vlprompt.data.formats.dassl",
    "read_imagefolder": "vlprompt.data.formats.imagefolder",
    "format_names": "vlprompt.data.formats",
    "get_format": "vlprompt.data.formats",
    "register_format": "vlprompt.data.formats",
    "ImageTextPairs": "vlprompt.data.pairs",
    "ImageTextPairsDataModule": "vlprompt.data.pairs",
    "ClassificationData": "vlprompt.data.protocol",
    "TestImagesDataModule": "vlprompt.data.test_images",
    "VOC_CLASSNAMES": "vlprompt.data.segmentation.samples",
    "SegmentationSample": "vlprompt.data.segmentation.samples",
    "SegmentationDataset": "vlprompt.data.segmentation.dataset",
    "collate_segmentation": "vlprompt.data.segmentation.dataset",
    "SegmentationDataModule": "vlprompt.data.segmentation.datamodule",
    "read_tunevlseg": "vlprompt.data.formats.tunevlseg",
    "read_voc": "vlprompt.data.formats.voc",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
