"""The data: ``labels.txt`` (``labels``), image decoding (``images``), a dataset folder and its torch
``Dataset`` (``folder``), splits (``splits``), and reading and showing user paths safely (``paths``)."""

from aimonk.data.folder import DatasetIndex, ImageDataset, index_dataset
from aimonk.data.images import (
    ImageLoadError,
    ImageSource,
    decode_uint8,
    file_digest,
    image_to_uint8,
    load_image,
    normalize_batch,
)
from aimonk.data.labels import NA, LabelFileError, LabelTable, parse_labels
from aimonk.data.paths import open_regular_file, read_reason, shown
from aimonk.data.splits import load_split, make_folds, make_split, save_split

__all__ = ["NA", "DatasetIndex", "ImageDataset", "ImageLoadError", "ImageSource", "LabelFileError", "LabelTable",
           "decode_uint8", "file_digest", "image_to_uint8", "index_dataset", "load_image", "load_split",
           "make_folds", "make_split", "normalize_batch", "open_regular_file", "parse_labels", "read_reason",
           "save_split", "shown"]
