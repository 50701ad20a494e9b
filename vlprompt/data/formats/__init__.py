"""Data formats: one registry of the on-disk layouts vlprompt reads, for classification,
segmentation and image-text pairs (:mod:`vlprompt.data.formats.registry`).

A new format is its own module here, whose reader is decorated with :func:`register_format`,
plus one import line below (importing the module registers it)::

    @register_format("myformat", task="classification", detect=looks_like_myformat)
    def read_myformat(source: ClassificationSource) -> SplitSamples: ...
"""

# The formats' import order is their registration order, which ``auto`` follows: keep it.
# isort: skip_file
from vlprompt.data.formats.registry import (
    ClassificationSource,
    DataFormat,
    SegmentationSource,
    add_format,
    detect_format,
    find_format,
    format_names,
    get_format,
    register_format,
    unregister_format,
)

# The formats shipped with vlprompt, one line each; within a task, ``auto`` tries them in this order.
from vlprompt.data.formats import csv_splits  # noqa: F401  classification: csv
from vlprompt.data.formats import dassl  # noqa: F401  classification: dassl (alias dassl_split)
from vlprompt.data.formats import imagefolder  # noqa: F401  classification: imagefolder (the fallback)
from vlprompt.data.formats import fgvc_variants  # noqa: F401  classification, descriptors only
from vlprompt.data.formats import tunevlseg  # noqa: F401  segmentation: tunevlseg
from vlprompt.data.formats import voc  # noqa: F401  segmentation: voc
from vlprompt.data.formats import caption_folder  # noqa: F401  pairs: caption_folder
from vlprompt.data.formats import webdataset  # noqa: F401  pairs: webdataset (tar shards)
from vlprompt.data.formats import caption_table  # noqa: F401  pairs: caption_table (.csv/.tsv)

__all__ = [
    "ClassificationSource",
    "DataFormat",
    "SegmentationSource",
    "add_format",
    "detect_format",
    "find_format",
    "format_names",
    "get_format",
    "register_format",
    "unregister_format",
]
