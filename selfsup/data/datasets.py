"""The one entry point to data: :func:`load_dataset` turns a data spec into a dataset.

Every dataset yields ``uint8`` RGB images shaped ``(3, S, S)`` at one fixed square size ``S`` and
``int64`` labels (``-1`` when unlabelled). The package is split by responsibility:

- :mod:`selfsup.data.scan`: scanning ImageNet-layout folders (classes, files, fingerprints);
- :mod:`selfsup.data.geometry`: where a view comes from (random-resized and centre crops);
- :mod:`selfsup.data.decode`: decoding one image into one view (reduced-scale JPEG decode, resize);
- :mod:`selfsup.data.cache`: the small-image cache (decode once, memory-map);
- :mod:`selfsup.data.stream`: streaming folders of large images, one view per item;
- :mod:`selfsup.data.shards`: WebDataset tar shards (``wds:DIR``), read by offset;
- :mod:`selfsup.data.builtin`: the embedded digits and torchvision datasets.

Colour and other per-sample augmentation is not done here: methods augment whole batches on the
device (see :mod:`selfsup.data.transforms`). selfsup never downloads data.

>>> ds = load_dataset("digits")
>>> images, labels = ds.__getitems__([0, 1])
>>> images.shape, images.dtype, labels.dtype
(torch.Size([2, 3, 32, 32]), torch.uint8, torch.int64)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from selfsup.data.builtin import DIGITS_SIZE, TORCHVISION, load_digits, load_torchvision
from selfsup.data.cache import (
    CACHE_FORMAT,
    MAX_CACHED_IMAGES,
    MAX_CACHED_SIZE,
    ArrayDataset,
    batch_collate,
    load_cached,
    warn_skipped,
)
from selfsup.data.decode import IMAGE_EXTENSIONS, image_size_of, load_image, to_rgb
from selfsup.data.geometry import DEFAULT_CROP_PCT
from selfsup.data.scan import Scan, content_digest, default_cache_dir, split_dir_of
from selfsup.data.shards import ShardStream, has_shard_split, load_shards
from selfsup.data.stream import FolderStream
from selfsup.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_CROP_PCT", "DEFAULT_STREAM_SIZE", "DIGITS_SIZE", "IMAGE_EXTENSIONS", "MAX_CACHED_IMAGES",
    "MAX_CACHED_SIZE", "ArrayDataset", "FolderStream", "ShardStream", "batch_collate", "default_cache_dir", "has_split",
    "load_dataset", "load_image", "parse_spec", "to_rgb",
]

DEFAULT_STREAM_SIZE = 224
"""Target size of a folder whose first image is larger than :data:`MAX_CACHED_SIZE` and no size is given."""

_SPLITS = ("train", "val")


INFER_SAMPLE = 2_000
"""How many train images (spread evenly over the sorted list) :func:`_infer_size` reads headers of."""


def _infer_size(scan: Scan, root: Path, skip_bad: bool) -> int:
    """The most common shorter side over (a sample of) the train images' headers; 224 if above 96.

    Reads only image headers (PIL decodes no pixels for ``.size``). When the files disagree, warns
    with the sizes found and the one chosen: one odd image can no longer set the size of a dataset.
    """
    from collections import Counter

    train = scan if scan.split_dir.name == "train" else Scan(root, "train")
    files = train.files
    if len(files) > INFER_SAMPLE:
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, INFER_SAMPLE)]
    sides: Counter[int] = Counter()
    for path in files:
        try:
            sides[min(image_size_of(path))] += 1
        except DataError:
            if skip_bad:
                continue
            raise
    if not sides:
        raise DataError(f"no readable image in {train.split_dir}")
    side = max(sides, key=lambda s: (sides[s], s))  # most common; the larger one on a tie
    chosen = side if side <= MAX_CACHED_SIZE else DEFAULT_STREAM_SIZE
    if len(sides) > 1:
        found = ", ".join(f"{s}px x{n}" for s, n in sides.most_common(4)) + (", ..." if len(sides) > 4 else "")
        warnings.warn(
            f"images in {train.split_dir} have different sizes (shorter sides of {sum(sides.values())} read: "
            f"{found}); using {chosen}px (the most common{'' if chosen == side else ', > 96px streams at 224'}); "
            f"pass --image-size to choose", stacklevel=3,
        )
    return chosen



def _load_folder(
    root: Path,
    split: str,
    image_size: int | None,
    cache_dir: Path,
    skip_bad: bool,
    crop_pct: float | None = None,
    workers: int | None = None,
) -> ArrayDataset | FolderStream:
    scan = Scan(root, split)
    if scan.bad and not skip_bad:
        raise DataError(scan.bad[0][1])
    size = image_size if image_size is not None else _infer_size(scan, root, skip_bad)
    name = f"folder:{root}"
    fingerprint = content_digest(root, split, scan, [CACHE_FORMAT, size, skip_bad])
    if len(scan.files) > MAX_CACHED_IMAGES or size > MAX_CACHED_SIZE:
        warn_skipped([p for p, _ in scan.bad], str(scan.split_dir))
        return FolderStream(scan.files, np.asarray(scan.labels), scan.classes, size, name, skip_bad=skip_bad,
                            fingerprint=fingerprint, crop_pct=DEFAULT_CROP_PCT if crop_pct is None else crop_pct)
    return load_cached(root, split, scan, size, cache_dir, skip_bad, name, fingerprint, workers)


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """Split a data spec into ``(kind, root)``: kind is digits, cifar10, cifar100, stl10, svhn, wds or folder."""
    if spec == "digits":
        return "digits", None
    kind, sep, rest = spec.partition(":")
    if sep and kind in (*TORCHVISION, "folder", "wds"):
        if not rest:
            raise DataError(f"data spec {spec!r} has no root: write {kind}:<path>")
        return kind, Path(rest).expanduser().resolve()
    return "folder", Path(spec).expanduser().resolve()


def has_split(spec: str, split: str) -> bool:
    """Whether ``spec`` has the split (``val`` of a folder: a ``val`` or ``test`` directory)."""
    kind, root = parse_spec(spec)
    if kind == "wds" and split != "train":
        return root is not None and has_shard_split(root, split)
    if kind != "folder" or split == "train":
        return True
    return root is not None and split_dir_of(root, split) is not None


def load_dataset(
    spec: str,
    split: str = "train",
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
    crop_pct: float | None = None,
) -> ArrayDataset | FolderStream | ShardStream:
    """Load a split of a dataset as uint8 ``(3, S, S)`` RGB images and int64 labels.

    Args:
        spec: ``"digits"`` (embedded, no files), ``"cifar10:<root>"``, ``"cifar100:<root>"``,
            ``"stl10:<root>"``, ``"svhn:<root>"`` (torchvision layout, never downloaded), or an
            ImageNet-layout directory ``root/{train,val}/<class>/<image>`` (optionally ``"folder:<root>"``),
            or ``"wds:<dir>"``, a folder of WebDataset tar shards (see :mod:`selfsup.data.shards`).
        split: ``"train"`` or ``"val"`` (a folder's ``val`` falls back to ``test``; a torchvision
            dataset's ``val`` is its test split); STL-10 also has ``"unlabeled"``.
        image_size: side of the square output; default 32 for digits, the native size for torchvision
            datasets, and for folders the most common shorter side of the train images (over a sample
            of up to 2,000 headers; a warning names the sizes when they disagree) if at most 96, else 224.
        cache_dir: where small folders are decoded once; default ``$SELFSUP_CACHE`` or
            ``~/.cache/selfsup/data``.
        skip_bad: skip (and count, with one warning) bad files instead of raising.
        crop_pct: streamed folders' evaluation views keep the centre ``crop_pct`` of the shorter side
            (shorter side resized to ``image_size / crop_pct``, centre crop); default 0.875 (256 -> 224).
            Cached and array datasets keep whole images.

    Returns:
        An :class:`ArrayDataset` (digits, torchvision, small folders: memory-mapped cache), a
        :class:`FolderStream` (folders over 200,000 images or over 96 pixels) or a :class:`ShardStream`
        (shards, at any size; images of at most 96 px are evaluated whole, as cached folders are).

    Raises:
        DataError: missing root, wrong layout, empty class, corrupt, truncated or non-image file; one
            line naming the path and the fix.
    """
    kind, root = parse_spec(spec)
    splits = (*_SPLITS, "unlabeled") if kind == "stl10" else _SPLITS
    if split not in splits:
        raise ConfigError(f"split must be one of {', '.join(splits)}, got {split!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive int, got {image_size!r}")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    if root is None:  # only the embedded digits have no root
        return load_digits(split, image_size)
    if kind in TORCHVISION:
        return load_torchvision(kind, root, split, image_size)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if kind == "wds":
        return load_shards(root, split, image_size, cache, skip_bad, crop_pct)
    return _load_folder(root, split, image_size, cache, skip_bad, crop_pct)
