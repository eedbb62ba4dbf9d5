"""One LightningDataModule per modality (importing this package imports Lightning and datasets)."""

from pituning.data.base import DataError, TaskDataModule, load_table
from pituning.data.text import TextClassificationDataModule
from pituning.data.vision import ImageClassificationDataModule, to_pixels
from pituning.data.vision_language import VisionLanguageDataModule

__all__ = [
    "DataError",
    "ImageClassificationDataModule",
    "TaskDataModule",
    "TextClassificationDataModule",
    "VisionLanguageDataModule",
    "load_table",
    "to_pixels",
]
