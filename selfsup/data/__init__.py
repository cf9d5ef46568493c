"""Data: datasets that yield uint8 RGB images and int64 labels, one DataModule, batched augmentations.

Its names load on first use: :class:`SelfSupDataModule` (a LightningDataModule) imports Lightning, the
datasets and transforms that evaluation reads do not.
"""

from typing import TYPE_CHECKING

from selfsup.lazy import lazy_exports

if TYPE_CHECKING:
    from selfsup.data.datamodule import SelfSupDataModule
    from selfsup.data.datasets import ArrayDataset, FolderStream, batch_collate, load_dataset
    from selfsup.data.transforms import make_augment, to_float

_LAZY = {
    "SelfSupDataModule": "selfsup.data.datamodule",
    "ArrayDataset": "selfsup.data.datasets",
    "FolderStream": "selfsup.data.datasets",
    "batch_collate": "selfsup.data.datasets",
    "load_dataset": "selfsup.data.datasets",
    "make_augment": "selfsup.data.transforms",
    "to_float": "selfsup.data.transforms",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)


__all__ = [
    "ArrayDataset",
    "FolderStream",
    "SelfSupDataModule",
    "batch_collate",
    "load_dataset",
    "make_augment",
    "to_float",
]
