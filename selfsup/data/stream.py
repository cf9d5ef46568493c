"""Streaming folders: image files decoded one view at a time in DataLoader workers.

A :class:`FolderStream` serves large images (ImageNet's ~500x375) at the training size without a
decode-once cache. Each item is placed by :mod:`selfsup.data.geometry` on the *original* image and
decoded once at that size (see :func:`~selfsup.data.decode.decode_view`):

- evaluation (the default): shorter side to ``image_size / crop_pct``, centre crop;
- training (:meth:`FolderStream.training_views`): a random-resized crop of the whole image with the
  method's scale range, drawn from ``(seed, epoch, index)`` so a resumed run gets the same crops.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from selfsup.data.decode import decode_view
from selfsup.data.geometry import DEFAULT_CROP_PCT, EvalCrop, TrainCrop, draw_rng
from selfsup.errors import DataError


def sample_epoch(index: int) -> int:
    """The epoch a sampler drew ``index`` in (:class:`~selfsup.data.sampler.SampleIndex`), else 0."""
    return int(getattr(index, "epoch", 0))


class FolderStream(Dataset):
    """Image files decoded lazily (in DataLoader workers) into one view each.

    Args:
        files: image paths.
        labels: ``(N,)`` int64 labels.
        classes: class names; ``labels`` index into it.
        image_size: side ``S`` of the square output.
        name: identifies the data, e.g. ``"folder:/abs/root"``.
        skip_bad: replace an unreadable file by the next readable one (with a warning) instead of raising.
        fingerprint: a digest of the files (paths, sizes, modification times), for cache keys.
        crop_pct: evaluation views keep the centre ``crop_pct`` of the shorter side.

    Shape:
        - ``self[i]``: ``((3, S, S) uint8, int)``
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        labels: np.ndarray,
        classes: list[str],
        image_size: int,
        name: str,
        skip_bad: bool = False,
        fingerprint: str = "",
        crop_pct: float = DEFAULT_CROP_PCT,
    ) -> None:
        self.files = [str(f) for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.shape != (len(self.files),):
            raise DataError(f"{name}: expected {len(self.files)} labels, got shape {self.labels.shape}")
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.name = name
        self.skip_bad = skip_bad
        self.eval_crop = EvalCrop(self.image_size, crop_pct)
        self.crop_pct = float(crop_pct)
        self.fingerprint = f"{fingerprint or f'{name}:{len(self.files)}'}:crop_pct={self.crop_pct}"
        self.train_crop: TrainCrop | None = None
        self.seed = 0
        self.bytes_only = False

    @property
    def transform(self) -> str:
        """How evaluation views are made (recorded with cached features and results)."""
        return (f"resize-shorter-side-to-{self.image_size / self.crop_pct:g}/centre-crop-{self.image_size}"
                f"/crop_pct={self.crop_pct:g}/no-augmentation")

    def training_views(self, crop: TrainCrop, seed: int) -> FolderStream:
        """A copy whose items are random-resized crops (``crop``) of the original images.

        Sample ``i`` of epoch ``e`` (the epoch travels with the index the sampler yields) is cropped
        with :func:`~selfsup.data.geometry.draw_rng` ``(seed, e, i)``.
        """
        if crop.size != self.image_size:
            raise DataError(f"{self.name}: training crops of {crop.size} px for {self.image_size} px images")
        views = copy.copy(self)
        views.train_crop, views.seed = crop, int(seed)
        return views

    def encoded(self) -> FolderStream:
        """A copy whose items are the files' encoded bytes, for decoding on the device
        (see :mod:`selfsup.data.device_decode`)."""
        views = copy.copy(self)
        views.bytes_only = True
        return views

    def _read(self, i: int, epoch: int) -> tuple:
        try:
            data = Path(self.files[i]).read_bytes()
        except OSError as err:
            raise DataError(f"{self.files[i]} cannot be read ({err.strerror or err})") from None
        place = self.eval_crop if self.train_crop is None else self.train_crop
        item = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        return item, int(self.labels[i]), (epoch, i), self.files[i], place, self.seed, self.skip_bad

    def __len__(self) -> int:
        return len(self.files)

    def view(self, i: int, epoch: int = 0) -> torch.Tensor:
        """The ``(3, S, S)`` uint8 view of file ``i`` (raises DataError for a bad file)."""
        if self.train_crop is None:
            return decode_view(self.files[i], self.eval_crop)
        return decode_view(self.files[i], self.train_crop, draw_rng(self.seed, epoch, i))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        epoch = sample_epoch(index)
        for offset in range(len(self.files)):
            i = (int(index) + offset) % len(self.files)
            try:
                if self.bytes_only:
                    return self._read(i, epoch)
                image = self.view(i, epoch)
            except DataError as err:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping bad image: {err}", stacklevel=2)
                continue
            return image, int(self.labels[i])
        raise DataError(f"{self.name}: no readable image left after skipping bad files")

    def __repr__(self) -> str:
        mode = "eval" if self.train_crop is None else "train"
        return (f"FolderStream({self.name!r}, n={len(self)}, size={self.image_size}, "
                f"classes={len(self.classes)}, {mode})")
