"""Readers of the classification formats people already have on disk, under their historical
module path; they live in :mod:`vlprompt.data.formats` (one module per format):

- CoOp/Dassl split files (:func:`read_dassl_split`);
- an ImageFolder tree (:func:`read_imagefolder`);
- CSV files with ``path,label`` rows (:func:`read_csv_splits`).
"""

from vlprompt.data.files import IMAGE_EXTENSIONS
from vlprompt.data.formats.csv_splits import read_csv_splits
from vlprompt.data.formats.dassl import read_dassl_split
from vlprompt.data.formats.imagefolder import folder_classnames, read_imagefolder
from vlprompt.data.samples import Sample, SplitSamples

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "SplitSamples",
    "folder_classnames",
    "read_csv_splits",
    "read_dassl_split",
    "read_imagefolder",
]
