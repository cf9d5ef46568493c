"""One LightningDataModule for every data source selfsup reads (digits, torchvision roots, folders, shards).

Batches are ``(images, labels)``: ``(B, 3, S, S)`` uint8 and ``(B,)`` int64. Loaders are plain
``DataLoader(dataset, batch_size, shuffle, drop_last)`` so Lightning can inject its
``DistributedSampler`` under DDP.
"""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from selfsup.data.cache import num_cpus
from selfsup.data.datasets import (
    ArrayDataset,
    FolderStream,
    batch_collate,
    has_split,
    load_dataset,
    parse_spec,
)
from selfsup.data.device_decode import DECODE_MODES, EncodedBatch, bytes_collate, decode_batch
from selfsup.data.geometry import DEFAULT_CROP_PCT
from selfsup.data.sampler import ResumableLoader, ResumableSampler, loader_generator
from selfsup.data.shards import ShardStream
from selfsup.errors import ConfigError, DataError


def default_workers(local_ranks: int = 1) -> int:
    """Loader workers per rank: the cores this process may run on (its CPU affinity, not the node's
    count), shared by the ranks on the node, less one for the training process; at least 1."""
    return max(1, num_cpus() // max(1, local_ranks) - 1)


class SelfSupDataModule(pl.LightningDataModule):
    """Train and val loaders over :func:`~selfsup.data.datasets.load_dataset`.

    Args:
        data: a data spec (see :func:`~selfsup.data.datasets.load_dataset`); default the embedded digits.
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader workers; default 0 for in-memory/cached arrays (a batch is one array
            read) and, for streamed folders, the cores this rank may use (``os.sched_getaffinity``)
            divided among the node's ranks, less one.
        image_size: side of the square images; default chosen by the dataset.
        cache_dir: cache for decoded small folders; default ``$SELFSUP_CACHE`` or ``~/.cache/selfsup/data``.
        skip_bad: skip and count bad image files instead of raising.
        val: load the val split when the data has one.
        seed: seed of the training order: epoch ``e`` is shuffled by ``seed + e`` alone, so a resumed
            run sees the same batches as an uninterrupted one (see :mod:`selfsup.data.sampler`).
        decode: where streamed folders are decoded: ``loader`` (DataLoader workers decode, crop and
            resize) or ``device`` (workers only read bytes; the batch is decoded, cropped and resized
            on the training device: nvJPEG on a GPU).
        crop_pct: evaluation views of large (streamed) images: shorter side to ``image_size / crop_pct``,
            then the centre ``image_size`` square (0.875: 256 then 224).

    Training views of streamed folders are random-resized crops of the whole original image with the
    method's scale range (its ``train_crop``), decoded once at the training size in the loader
    workers; the method then only flips and colour-augments them, batched on the device.
    """

    def __init__(
        self,
        data: str = "digits",
        batch_size: int = 256,
        num_workers: int | None = None,
        image_size: int | None = None,
        cache_dir: str | None = None,
        skip_bad: bool = False,
        val: bool = True,
        seed: int = 0,
        crop_pct: float = DEFAULT_CROP_PCT,
        decode: str = "loader",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size!r}")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers!r}")
        self.data = data
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.skip_bad = skip_bad
        self.val = val
        self.seed = seed
        if not 0.0 < crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        self.crop_pct = crop_pct
        if decode not in DECODE_MODES:
            raise ConfigError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.decode = decode
        self._image_size = image_size
        self._train: ArrayDataset | FolderStream | None = None
        self._val: ArrayDataset | FolderStream | None = None

    def _load(self, split: str, image_size: int | None) -> ArrayDataset | FolderStream:
        return load_dataset(
            self.data, split, image_size=image_size, cache_dir=self.cache_dir, skip_bad=self.skip_bad,
            crop_pct=self.crop_pct,
        )

    def _has_val(self) -> bool:
        return self.val and has_split(self.data, "val")

    def prepare_data(self) -> None:
        """Decode a small folder into the cache, or index shards, once (Lightning calls this on one
        process per node)."""
        if parse_spec(self.data)[0] not in ("folder", "wds"):  # wds: index the shards once per node
            return
        train = self._load("train", self._image_size)
        if self._has_val():
            self._load("val", train.image_size)

    def setup(self, stage: str | None = None) -> None:
        """Load the train and (when present) val splits; val at the train split's image size."""
        if self._train is not None:
            return
        self._train = self._load("train", self._image_size)
        self._val = self._load("val", self._train.image_size) if self._has_val() else None

    def _require_setup(self) -> ArrayDataset | FolderStream:
        if self._train is None:
            raise RuntimeError("SelfSupDataModule: call setup() before using the datasets")
        return self._train

    @property
    def train_set(self) -> ArrayDataset | FolderStream:
        """The train dataset."""
        return self._require_setup()

    @property
    def val_set(self) -> ArrayDataset | FolderStream | None:
        """The val dataset, or None when the data has no val split (or ``val=False``)."""
        self._require_setup()
        return self._val

    @property
    def num_classes(self) -> int:
        """Number of classes of the train split."""
        return len(self._require_setup().classes)

    @property
    def image_size(self) -> int:
        """Side of the square images."""
        return self._require_setup().image_size

    def dataloader(self, split: str, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        """A DataLoader over one split (``"train"`` or ``"val"``).

        The train split (``shuffle=True``) gets a :class:`~selfsup.data.sampler.ResumableLoader`: its
        order depends on ``seed`` and the epoch only, it is split over DDP ranks itself, and Lightning
        saves its position in checkpoints. No loader draws from the global RNG.
        """
        if split not in ("train", "val"):
            raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
        dataset = self.train_set if split == "train" else self.val_set
        if dataset is None:
            raise DataError(f"{self.data} has no val split: add root/val/<class>/<image> (or root/test/...)")
        trainer = self._trainer_or_none()
        if isinstance(dataset, ArrayDataset):
            workers = 0 if self.num_workers is None else self.num_workers
            collate = batch_collate
        else:
            local = getattr(trainer, "num_devices", None) or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
            workers = default_workers(local) if self.num_workers is None else self.num_workers
            collate = None
        if shuffle:
            dataset = self._training_views(dataset, trainer)
        if isinstance(dataset, FolderStream) and self.decode == "device":
            dataset, collate = dataset.encoded(), bytes_collate
        common = {
            "batch_size": self.batch_size, "drop_last": drop_last, "num_workers": workers, "collate_fn": collate,
            "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available(),
            "generator": loader_generator(self.seed),
        }
        if not shuffle:
            return DataLoader(dataset, shuffle=False, **common)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Shards: each rank takes floor(n / ranks) samples of the epoch's permutation, so none is read twice.
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                                   drop_last=isinstance(dataset, ShardStream))
        progress = (lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed) if trainer else None
        return ResumableLoader(dataset, sampler=sampler, progress=progress, **common)

    def _training_views(self, dataset, trainer):
        """A streamed folder's training views: the attached method's random-resized crops, in the loader."""
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if not isinstance(dataset, FolderStream) or not hasattr(module, "train_crop"):
            return dataset
        module.crops_in_loader = True  # the method must not crop these views again
        return dataset.training_views(module.train_crop(dataset.image_size), self.seed)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """``--decode device``: decode, crop and resize a bytes batch on the training device."""
        if isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[0], EncodedBatch):
            trainer = self._trainer_or_none()
            device = trainer.strategy.root_device if trainer is not None else "cpu"
            return decode_batch(*batch, device=device)
        return batch

    def _trainer_or_none(self):
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer
            return None

    def train_dataloader(self) -> DataLoader:
        """Shuffled; drops the last partial batch only when there is more than one batch."""
        return self.dataloader("train", shuffle=True, drop_last=len(self.train_set) > self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        """In order, every image; ``[]`` when there is no val split."""
        if self.val_set is None:
            return []
        return self.dataloader("val")
