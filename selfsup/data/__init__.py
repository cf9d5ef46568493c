"""Data: datasets that yield uint8 RGB images and int64 labels, one DataModule, batched augmentations.

Its names load on first use: :class:`SelfSupDataModule` (a LightningDataModule) imports Lightning, the
datasets and transforms that evaluation reads do not.
"""

import importlib
from typing import TYPE_CHECKING

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


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'selfsup.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ArrayDataset",
    "FolderStream",
    "SelfSupDataModule",
    "batch_collate",
    "load_dataset",
    "make_augment",
    "to_float",
]
