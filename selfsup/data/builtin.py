"""The embedded digits and torchvision datasets read from a local root (never downloaded), as arrays."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.data.cache import ArrayDataset
from selfsup.data.scan import tree_fingerprint
from selfsup.errors import DataError

DIGITS_SIZE = 32
"""Default size of the embedded digits (upsampled from 8x8)."""

TORCHVISION = ("cifar10", "cifar100", "stl10", "svhn")


@lru_cache(maxsize=4)
def _digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))[:, None]  # (N, 1, 8, 8) in 0..255
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    gray = x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()  # (N, S, S)
    images = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=3))  # (N, S, S) -> (N, S, S, 3)
    labels = digits.target.astype(np.int64)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    for a in (images, labels):
        a.setflags(write=False)  # shared by every dataset built from the lru_cache
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def load_digits(split: str, image_size: int | None) -> ArrayDataset:
    size = DIGITS_SIZE if image_size is None else image_size
    x_train, y_train, x_val, y_val = _digits_arrays(size)
    images, labels = (x_train, y_train) if split == "train" else (x_val, y_val)
    return ArrayDataset(images, labels, [str(i) for i in range(10)], "digits", f"digits:{split}:{images.shape}")


def _resize_array(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Resize ``(N, H, W, 3)`` uint8 images to ``(N, size, size, 3)`` (bilinear, antialiased), in chunks."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for s in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + chunk])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[s : s + chunk] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def load_torchvision(kind: str, root: Path, split: str, image_size: int | None) -> ArrayDataset:
    import torchvision.datasets as tvd

    layouts = {
        "cifar10": "cifar-10-batches-py/",
        "cifar100": "cifar-100-python/",
        "stl10": "stl10_binary/",
        "svhn": "train_32x32.mat, test_32x32.mat",
    }
    try:
        if kind in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
            ds = cls(str(root), train=split == "train", download=False)
            images, labels, classes = ds.data, np.asarray(ds.targets), list(ds.classes)
        elif kind == "stl10":
            ds = tvd.STL10(str(root), split={"val": "test"}.get(split, split), download=False)
            images, labels, classes = ds.data.transpose(0, 2, 3, 1), ds.labels, list(ds.classes)
        else:
            ds = tvd.SVHN(str(root), split={"val": "test"}.get(split, split), download=False)
            images, labels, classes = ds.data.transpose(0, 2, 3, 1), ds.labels, [str(i) for i in range(10)]
    except (RuntimeError, OSError) as err:
        reason = str(err).split(". You can use download=True")[0]  # selfsup never downloads
        raise DataError(
            f"{kind} not found under {root} ({reason}): put the dataset there in torchvision's layout "
            f"({root}/{layouts[kind]}); selfsup never downloads"
        ) from None
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if image_size is not None and image_size != images.shape[1]:
        images = _resize_array(images, image_size)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),):  # STL-10 unlabelled: torchvision may give no labels
        labels = np.full(len(images), -1, dtype=np.int64)
    fingerprint = hashlib.sha256(f"{kind}:{split}:{images.shape}:{tree_fingerprint(root)}".encode()).hexdigest()
    return ArrayDataset(images, labels, classes, f"{kind}:{root}", fingerprint)
