"""Data: datasets that yield uint8 RGB images and int64 labels, one DataModule, batched augmentations."""

from selfsup.data.datamodule import SelfSupDataModule
from selfsup.data.datasets import ArrayDataset, FolderStream, batch_collate, load_dataset
from selfsup.data.transforms import make_augment, to_float

__all__ = [
    "ArrayDataset",
    "FolderStream",
    "SelfSupDataModule",
    "batch_collate",
    "load_dataset",
    "make_augment",
    "to_float",
]
