"""Datasets: the embedded digits, torchvision datasets from a local root, and ImageNet-layout folders.

Every dataset yields ``uint8`` RGB images shaped ``(3, S, S)`` at one fixed square size ``S`` and
``int64`` labels (``-1`` when unlabelled). Augmentation is not done here: methods augment whole
batches on the device (see :mod:`selfsup.data.transforms`).

Small folders (at most :data:`MAX_CACHED_IMAGES` images, at most :data:`MAX_CACHED_SIZE` pixels) are
decoded once by a process pool into a ``uint8`` array saved as ``.npy`` in a cache directory and
memory-mapped on every later load; large folders stream through :class:`FolderStream`, decoding in
DataLoader workers. selfsup never downloads data.

>>> ds = load_dataset("digits")
>>> images, labels = ds.__getitems__([0, 1])
>>> images.shape, images.dtype, labels.dtype
(torch.Size([2, 3, 32, 32]), torch.uint8, torch.int64)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from selfsup.checkpoint import atomic_write, atomic_write_text, clean_stale_temp_files, finish_temp, temp_path
from selfsup.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
"""File extensions accepted in a folder dataset (compared case-insensitively)."""

MAX_CACHED_IMAGES = 200_000
"""Folders with more images than this stream through :class:`FolderStream` instead of the array cache."""

MAX_CACHED_SIZE = 96
"""Folders whose target size exceeds this (in pixels) stream instead of being cached."""

DEFAULT_STREAM_SIZE = 224
"""Target size of a folder whose first image is larger than :data:`MAX_CACHED_SIZE` and no size is given."""

DIGITS_SIZE = 32
"""Default size of the embedded digits (upsampled from 8x8)."""

CACHE_FORMAT = 1  # bump when the cache layout or the decoding changes, so old caches are not reused
_POOL_MIN_IMAGES = 2_000  # below this, decoding in-process beats starting a pool
_CHUNK = 256  # images per pool task

_TORCHVISION = ("cifar10", "cifar100", "stl10", "svhn")
_SPLITS = ("train", "val")
_SKIP_HINT = "or pass --skip-bad-images (skip_bad=True) to skip bad files"


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


class ArrayDataset(Dataset):
    """Images held in one ``uint8`` array (in memory or a read-only memory map).

    Args:
        images: ``(N, S, S, 3)`` uint8 RGB images; may be a read-only ``np.memmap``.
        labels: ``(N,)`` int64 labels, ``-1`` for unlabelled images.
        classes: class names; ``labels`` index into it.
        name: identifies the data, e.g. ``"digits"`` or ``"folder:/abs/root"``.
        fingerprint: a digest of the content it was built from (files' paths, sizes and modification
            times; the decoding settings), so caches built from it are keyed by content, not by name.

    Shape:
        - ``self[i]``: ``((3, S, S) uint8, int)``
        - ``self.__getitems__(indices)``: ``((B, 3, S, S) uint8, (B,) int64)``
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, fingerprint: str = ""
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise DataError(
                f"{name}: images must be uint8 shaped (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if images.shape[1] != images.shape[2]:
            raise DataError(f"{name}: images must be square, got {images.shape[1]}x{images.shape[2]}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise DataError(f"{name}: expected {len(images)} labels, got shape {labels.shape}")
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.name = name
        self.fingerprint = fingerprint or f"{name}:{images.shape}"
        self.image_size = int(images.shape[1])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self.images[index]))  # copy: the memmap is read-only
        return image.permute(2, 0, 1).contiguous(), int(self.labels[index])  # (S, S, 3) -> (3, S, S)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fetch a whole batch with one array read (sorted for the memory map, returned in request order)."""
        index = np.asarray(indices, dtype=np.int64)
        order = np.argsort(index, kind="stable")
        data = self.images[index[order]]  # sorted reads are sequential on a memory map
        batch = np.empty_like(data)
        batch[order] = data  # restore the requested order
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()  # (B, S, S, 3) -> (B, 3, S, S)
        return images, torch.from_numpy(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset({self.name!r}, n={len(self)}, size={self.image_size}, classes={len(self.classes)})"
        )


def batch_collate(batch: Any) -> Any:
    """Collate that passes through a batch already built by ``__getitems__`` and default-collates otherwise."""
    # __getitems__ returns a tuple of batched tensors; a list of samples is collated as usual.
    if isinstance(batch, tuple) and all(isinstance(b, torch.Tensor) for b in batch):
        return batch
    return default_collate(batch)


class FolderStream(Dataset):
    """Image files decoded lazily (in DataLoader workers): RGB, shorter side resized, centre-cropped.

    Args:
        files: image paths.
        labels: ``(N,)`` int64 labels.
        classes: class names; ``labels`` index into it.
        image_size: side ``S`` of the square output.
        name: identifies the data, e.g. ``"folder:/abs/root"``.
        skip_bad: replace an unreadable file by the next readable one (with a warning) instead of raising.
        fingerprint: a digest of the files (paths, sizes, modification times), for cache keys.

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
    ) -> None:
        self.files = [str(f) for f in files]
        self.fingerprint = fingerprint or f"{name}:{len(self.files)}"
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.shape != (len(self.files),):
            raise DataError(f"{name}: expected {len(self.files)} labels, got shape {self.labels.shape}")
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.name = name
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                image = load_image(self.files[i], self.image_size)
            except DataError as err:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping bad image: {err}", stacklevel=2)
                continue
            return torch.from_numpy(image).permute(2, 0, 1).contiguous(), int(self.labels[i])
        raise DataError(f"{self.name}: no readable image left after skipping bad files")

    def __repr__(self) -> str:
        return (
            f"FolderStream({self.name!r}, n={len(self)}, size={self.image_size}, classes={len(self.classes)})"
        )


# --------------------------------------------------------------------------------------------------
# Decoding one image
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    # A truncated file must fail, not decode as grey padding (a silent wrong result).
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _scale_to_uint8(array: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Map pixel values of any depth to 0..255 without clipping 16-bit images to white.

    ``sixteen_bit`` (PIL's ``I;16*`` modes) always divides by 257 (65535 -> 255). Otherwise (modes ``I``
    and ``F``): floats in [0, 1] are scaled by 255, values in 0..255 are kept, values in 0..65535 are
    taken as 16-bit, and anything else is min-max scaled.
    """
    values = array.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if sixteen_bit or (lo >= 0 and 255 < hi <= 65535):
        values = values / 257.0
    elif array.dtype.kind == "f" and lo >= 0 and hi <= 1.0:
        values = values * 255.0
    elif not (lo >= 0 and hi <= 255):
        values = (values - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, RGBA, P, CMYK, 1, 16-bit I;16*, I, F, ...) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(image), sixteen_bit=image.mode.startswith("I;16"))
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the palette's transparency needs RGBA first (PIL warns otherwise)
    return image.convert("RGB")


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one file to a ``(size, size, 3)`` uint8 RGB array (shorter side resized, centre crop).

    Raises:
        DataError: the file is not an image, or is corrupt or truncated; the message names the path.
    """
    if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(_not_image_message(path))
    try:
        with _strict_truncation(), Image.open(path) as image:
            image.load()
            rgb = to_rgb(image)
            if rgb.size != (size, size):
                rgb = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BILINEAR)
            return np.array(rgb, dtype=np.uint8)  # writable, so torch.from_numpy does not warn
    except UnidentifiedImageError:
        raise DataError(
            f"{path} is not a readable image (PIL cannot identify it): replace or remove it, {_SKIP_HINT}"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{path} is corrupt or truncated ({err}): replace or remove it, {_SKIP_HINT}"
        ) from None


def _not_image_message(path: str | Path) -> str:
    exts = " ".join(sorted(IMAGE_EXTENSIONS))
    return (
        f"{path} is not an image file (extension {Path(path).suffix or '(none)'!r}; accepted: {exts}): "
        f"move it out of the class folder, {_SKIP_HINT}"
    )


def _image_size_of(path: str | Path) -> int:
    """Shorter side of an image (read from its header, no full decode)."""
    try:
        with Image.open(path) as image:
            return min(image.size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # a bomb: its header says so
        raise DataError(
            f"{path} is not a readable image ({err}): replace or remove it, {_SKIP_HINT}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Folders: scan, cache key, decode-once
# --------------------------------------------------------------------------------------------------


def _visible_entries(directory: Path) -> list[os.DirEntry]:
    with os.scandir(directory) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _walk_files(directory: Path) -> Iterator[os.DirEntry]:
    """Non-hidden files under ``directory``, recursively, in sorted order."""
    for entry in _visible_entries(directory):
        if entry.is_dir():
            yield from _walk_files(Path(entry.path))
        elif entry.is_file():
            yield entry


def _class_names(train_dir: Path, root: Path) -> list[str]:
    classes = [e.name for e in _visible_entries(train_dir) if e.is_dir()]
    if not classes:
        raise DataError(
            f"{train_dir} has no class folders: expected the layout {root}/train/<class>/<image> "
            f"(one sub-folder per class)"
        )
    return classes


def _split_dir(root: Path, split: str) -> Path | None:
    if split == "train":
        return root / "train" if (root / "train").is_dir() else None
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    return None


class _Scan:
    """Files of one split of a folder: absolute paths, labels, stat fingerprint and bad files."""

    def __init__(self, root: Path, split: str) -> None:
        if not root.exists():
            raise DataError(
                f"data root {root} does not exist: give a directory in the layout "
                f"root/train/<class>/<image>, or 'digits' for the embedded data"
            )
        if not root.is_dir():
            raise DataError(
                f"data root {root} is not a directory: expected the layout root/train/<class>/<image>"
            )
        train_dir = _split_dir(root, "train")
        if train_dir is None:
            raise DataError(
                f"{root} has no 'train' directory: expected the layout root/train/<class>/<image> "
                f"(and optionally root/val/<class>/<image>)"
            )
        self.classes = _class_names(train_dir, root)
        split_dir = _split_dir(root, split)
        if split_dir is None:
            raise DataError(f"{root} has no 'val' or 'test' directory: expected root/val/<class>/<image>")
        self.split_dir = split_dir
        index = {c: i for i, c in enumerate(self.classes)}
        class_dirs = [e.name for e in _visible_entries(split_dir) if e.is_dir()]
        if not class_dirs:
            raise DataError(
                f"{split_dir} has no class folders: expected the layout "
                f"{root}/{split_dir.name}/<class>/<image>"
            )
        unknown = [c for c in class_dirs if c not in index]
        if unknown:
            raise DataError(
                f"{split_dir / unknown[0]} is a class that {train_dir} does not have: the classes of "
                f"{split_dir.name} must be a subset of the train classes"
            )
        self.files: list[str] = []
        self.labels: list[int] = []
        self.fingerprint: list[tuple[str, int, int]] = []
        self.bad: list[tuple[str, str]] = []  # (path, message)
        for name in class_dirs:
            class_dir = split_dir / name
            n_images = 0
            for entry in _walk_files(class_dir):
                if Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
                    self.bad.append((entry.path, _not_image_message(entry.path)))
                    continue
                st = entry.stat()
                self.files.append(entry.path)
                self.labels.append(index[name])
                self.fingerprint.append((os.path.relpath(entry.path, root), st.st_size, st.st_mtime_ns))
                n_images += 1
            if n_images == 0:
                raise DataError(
                    f"class folder {class_dir} has no images: add images to it or remove the folder"
                )


def default_cache_dir() -> Path:
    """``$SELFSUP_CACHE`` if set, else ``~/.cache/selfsup/data``."""
    return Path(os.environ.get("SELFSUP_CACHE") or Path.home() / ".cache" / "selfsup" / "data")


def _content_digest(root: Path, split: str, scan: _Scan, size: int, skip_bad: bool) -> str:
    """Digest of a split's files (relative paths, sizes, modification times) and how they are decoded."""
    key = json.dumps([CACHE_FORMAT, str(root), split, size, skip_bad, scan.classes, scan.fingerprint])
    return hashlib.sha256(key.encode()).hexdigest()


def _tree_fingerprint(root: Path, limit: int = 10_000) -> str:
    """Digest of the files under ``root`` (relative paths, sizes, modification times), at most ``limit``."""
    h = hashlib.sha256(str(root).encode())
    for i, (dirpath, dirnames, filenames) in enumerate(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.stat(path)
                h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if i >= limit:
            break
    return h.hexdigest()


def _cache_stem(root: Path, split: str, scan: _Scan, size: int, skip_bad: bool) -> str:
    digest = _content_digest(root, split, scan, size, skip_bad)[:20]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.name)[:40]
    return f"{safe}-{split}-{size}px-{digest}"


def _decode_chunk(task: tuple[int, list[str], int]) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    """Pool worker: decode a chunk of files; bad files come back as (index, message), never as exceptions."""
    start, paths, size = task
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    for j, path in enumerate(paths):
        try:
            out[j] = load_image(path, size)
        except DataError as err:
            bad.append((start + j, str(err)))
    return start, out, bad


def _pool_context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds and they only run PIL; spawn would re-import torch in each.
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context()


def _num_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _decode_files(
    paths: list[str], size: int, out: np.ndarray, skip_bad: bool, workers: int | None = None, label: str = ""
) -> list[tuple[int, str]]:
    """Decode ``paths`` into ``out`` (``(N, size, size, 3)``), in a process pool with a rich progress bar.

    Returns the bad files as ``(index, message)``; raises the first one as :class:`DataError` unless
    ``skip_bad``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from selfsup.progress import make_progress

    if workers is None:
        workers = min(8, _num_cpus()) if len(paths) >= _POOL_MIN_IMAGES else 0
    tasks = [(s, paths[s : s + _CHUNK], size) for s in range(0, len(paths), _CHUNK)]
    bad: list[tuple[int, str]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with make_progress(*columns) as progress:
        bar = progress.add_task(f"decoding {label}", total=len(paths))
        pool = _pool_context().Pool(workers) if workers > 0 else None
        try:
            results = pool.imap(_decode_chunk, tasks) if pool is not None else map(_decode_chunk, tasks)
            # Results come in file order, so the error raised is the first bad file's.
            for start, chunk, chunk_bad in results:
                if chunk_bad and not skip_bad:
                    raise DataError(chunk_bad[0][1])
                out[start : start + len(chunk)] = chunk
                bad.extend(chunk_bad)
                progress.advance(bar, len(chunk))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return bad


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array)


def _compact_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".c")


def _warn_skipped(skipped: list[str], where: str) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} bad file(s) in {where} (first: {skipped[0]})", stacklevel=3)


def _cache_paths(cache_dir: Path, stem: str) -> tuple[Path, Path, Path]:
    """(images, labels, meta) files of one cache entry."""
    return cache_dir / f"{stem}.images.npy", cache_dir / f"{stem}.labels.npy", cache_dir / f"{stem}.json"


def _build_cache(
    scan: _Scan, size: int, cache_dir: Path, stem: str, skip_bad: bool, workers: int | None
) -> tuple[np.ndarray, list[str]]:
    """Decode the scanned files into the cache entry ``stem``; returns (labels, skipped paths).

    Labels and metadata are written first and the images last, each to a temporary file renamed
    atomically, so a concurrent or interrupted build never leaves an entry that looks complete.
    """
    images_path, labels_path, meta_path = _cache_paths(cache_dir, stem)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(images_path)  # <name>.tmp-<pid>: a killed build's leftovers are removed by the next one
    clean_stale_temp_files(cache_dir)
    labels = np.asarray(scan.labels, dtype=np.int64)
    try:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(scan.files), size, size, 3)
        )
        bad = _decode_files(scan.files, size, out, skip_bad, workers, label=str(scan.split_dir))
        if bad:
            keep = np.ones(len(scan.files), dtype=bool)
            keep[[i for i, _ in bad]] = False
            if not keep.any():
                raise DataError(
                    f"no readable image left in {scan.split_dir} after skipping {len(bad)} bad files "
                    f"(first: {scan.files[bad[0][0]]})"
                )
            compact = np.lib.format.open_memmap(
                _compact_path(tmp), mode="w+", dtype=np.uint8, shape=(int(keep.sum()), size, size, 3)
            )
            compact[:] = out[keep]
            compact.flush()
            del out, compact
            os.replace(_compact_path(tmp), tmp)
            labels = labels[keep]
        else:
            out.flush()
            del out
        skipped = [p for p, _ in scan.bad] + [scan.files[i] for i, _ in bad]
        _save_npy_atomic(labels_path, labels)
        meta = {
            "format": CACHE_FORMAT,
            "classes": scan.classes,
            "n": len(labels),
            "size": size,
            "root": str(scan.split_dir),
            "skipped": skipped,
        }
        atomic_write_text(meta_path, json.dumps(meta))
        finish_temp(tmp, images_path)  # last: the images file existing means the cache entry is complete
    finally:
        tmp.unlink(missing_ok=True)
        _compact_path(tmp).unlink(missing_ok=True)
    return labels, skipped


INFER_SAMPLE = 2_000
"""How many train images (spread evenly over the sorted list) :func:`_infer_size` reads headers of."""


def _infer_size(scan: _Scan, root: Path, skip_bad: bool) -> int:
    """The most common shorter side over (a sample of) the train images' headers; 224 if above 96.

    Reads only image headers (PIL decodes no pixels for ``.size``). When the files disagree, warns
    with the sizes found and the one chosen: one odd image can no longer set the size of a dataset.
    """
    from collections import Counter

    train = scan if scan.split_dir.name == "train" else _Scan(root, "train")
    files = train.files
    if len(files) > INFER_SAMPLE:
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, INFER_SAMPLE)]
    sides: Counter[int] = Counter()
    for path in files:
        try:
            sides[_image_size_of(path)] += 1
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
    workers: int | None = None,
) -> ArrayDataset | FolderStream:
    scan = _Scan(root, split)
    if scan.bad and not skip_bad:
        raise DataError(scan.bad[0][1])
    size = image_size if image_size is not None else _infer_size(scan, root, skip_bad)
    name = f"folder:{root}"
    fingerprint = _content_digest(root, split, scan, size, skip_bad)
    if len(scan.files) > MAX_CACHED_IMAGES or size > MAX_CACHED_SIZE:
        _warn_skipped([p for p, _ in scan.bad], str(scan.split_dir))
        return FolderStream(scan.files, np.asarray(scan.labels), scan.classes, size, name, skip_bad=skip_bad,
                            fingerprint=fingerprint)
    stem = _cache_stem(root, split, scan, size, skip_bad)
    images_path, labels_path, meta_path = _cache_paths(cache_dir, stem)
    if images_path.exists() and labels_path.exists() and meta_path.exists():
        labels = np.load(labels_path)
        skipped = json.loads(meta_path.read_text()).get("skipped", [])
    else:
        labels, skipped = _build_cache(scan, size, cache_dir, stem, skip_bad, workers)
    _warn_skipped(skipped, str(scan.split_dir))
    dataset = ArrayDataset(np.load(images_path, mmap_mode="r"), labels, scan.classes, name, fingerprint)
    gone = set(skipped)
    dataset.files = [f for f in scan.files if f not in gone]  # each row's file: portable subsets, subset lists
    return dataset


# --------------------------------------------------------------------------------------------------
# Embedded digits and torchvision datasets
# --------------------------------------------------------------------------------------------------


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


def _load_digits(split: str, image_size: int | None) -> ArrayDataset:
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


def _load_torchvision(kind: str, root: Path, split: str, image_size: int | None) -> ArrayDataset:
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
    fingerprint = hashlib.sha256(f"{kind}:{split}:{images.shape}:{_tree_fingerprint(root)}".encode()).hexdigest()
    return ArrayDataset(images, labels, classes, f"{kind}:{root}", fingerprint)


# --------------------------------------------------------------------------------------------------
# The one entry point
# --------------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """Split a data spec into ``(kind, root)``: kind is digits, cifar10, cifar100, stl10, svhn or folder."""
    if spec == "digits":
        return "digits", None
    kind, sep, rest = spec.partition(":")
    if sep and kind in (*_TORCHVISION, "folder"):
        if not rest:
            raise DataError(f"data spec {spec!r} has no root: write {kind}:<path>")
        return kind, Path(rest).expanduser().resolve()
    return "folder", Path(spec).expanduser().resolve()


def has_split(spec: str, split: str) -> bool:
    """Whether ``spec`` has the split (``val`` of a folder: a ``val`` or ``test`` directory)."""
    kind, root = parse_spec(spec)
    if kind != "folder" or split == "train":
        return True
    return root is not None and _split_dir(root, split) is not None


def load_dataset(
    spec: str,
    split: str = "train",
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
) -> ArrayDataset | FolderStream:
    """Load a split of a dataset as uint8 ``(3, S, S)`` RGB images and int64 labels.

    Args:
        spec: ``"digits"`` (embedded, no files), ``"cifar10:<root>"``, ``"cifar100:<root>"``,
            ``"stl10:<root>"``, ``"svhn:<root>"`` (torchvision layout, never downloaded), or an
            ImageNet-layout directory ``root/{train,val}/<class>/<image>`` (optionally ``"folder:<root>"``).
        split: ``"train"`` or ``"val"`` (a folder's ``val`` falls back to ``test``; a torchvision
            dataset's ``val`` is its test split); STL-10 also has ``"unlabeled"``.
        image_size: side of the square output; default 32 for digits, the native size for torchvision
            datasets, and for folders the most common shorter side of the train images (over a sample
            of up to 2,000 headers; a warning names the sizes when they disagree) if at most 96, else 224.
        cache_dir: where small folders are decoded once; default ``$SELFSUP_CACHE`` or
            ``~/.cache/selfsup/data``.
        skip_bad: skip (and count, with one warning) bad files instead of raising.

    Returns:
        An :class:`ArrayDataset` (digits, torchvision, small folders: memory-mapped cache) or a
        :class:`FolderStream` (folders over 200,000 images or over 96 pixels).

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
    if root is None:  # only the embedded digits have no root
        return _load_digits(split, image_size)
    if kind in _TORCHVISION:
        return _load_torchvision(kind, root, split, image_size)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _load_folder(root, split, image_size, cache, skip_bad)
