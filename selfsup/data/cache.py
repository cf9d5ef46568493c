"""The small-image cache: images held in one ``uint8`` array, and the decode-once build from a folder.

Folders of at most :data:`MAX_CACHED_IMAGES` images at a size of at most :data:`MAX_CACHED_SIZE` pixels
are decoded once, by a process pool, into a ``(N, S, S, 3)`` array saved as ``.npy`` and memory-mapped
on every later load. Each image is kept **whole**, resized to ``S`` x ``S``: a non-square image is not
cropped (no content is discarded) but its aspect ratio changes; one warning per load says how many
images that was and the largest aspect ratio among them. Random crops of cached images are taken on
the training device by the method (:meth:`selfsup.ssl.module.SSLModule.augment`).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from selfsup.checkpoint import atomic_write, atomic_write_text, clean_stale_temp_files, finish_temp, temp_path
from selfsup.data.decode import image_size_of, load_image
from selfsup.data.scan import Scan, content_digest
from selfsup.errors import DataError

MAX_CACHED_IMAGES = 200_000
"""Folders with more images than this stream through :class:`~selfsup.data.stream.FolderStream` instead."""

MAX_CACHED_SIZE = 96
"""Folders whose target size exceeds this (in pixels) stream instead of being cached."""

CACHE_FORMAT = 2  # bump when the cache layout or the decoding changes, so old caches are not reused
_POOL_MIN_IMAGES = 2_000  # below this, decoding in-process beats starting a pool
_CHUNK = 256  # images per pool task


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



def _decode_chunk(task: tuple[int, list[str], int]) -> tuple[int, np.ndarray, list[tuple[int, str]], list[float]]:
    """Pool worker: decode a chunk of files whole; bad files come back as (index, message), never raised.

    Also returns the aspect ratio (longer / shorter side) of every non-square image.
    """
    start, paths, size = task
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    aspects: list[float] = []
    for j, path in enumerate(paths):
        try:
            h, w = image_size_of(path)
            out[j] = load_image(path, size)
        except DataError as err:
            bad.append((start + j, str(err)))
            continue
        if h != w:
            aspects.append(max(h, w) / min(h, w))
    return start, out, bad, aspects


def _pool_context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds and they only run PIL; spawn would re-import torch in each.
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context()


def num_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _decode_files(
    paths: list[str], size: int, out: np.ndarray, skip_bad: bool, workers: int | None = None, label: str = "",
    aspects: list[float] | None = None,
) -> list[tuple[int, str]]:
    """Decode ``paths`` whole into ``out`` (``(N, size, size, 3)``), in a process pool with a progress bar.

    Returns the bad files as ``(index, message)``; raises the first one as :class:`DataError` unless
    ``skip_bad``. The aspect ratios of non-square images are appended to ``aspects`` when given.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from selfsup.progress import make_progress

    if workers is None:
        workers = min(8, num_cpus()) if len(paths) >= _POOL_MIN_IMAGES else 0
    tasks = [(s, paths[s : s + _CHUNK], size) for s in range(0, len(paths), _CHUNK)]
    bad: list[tuple[int, str]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with make_progress(*columns) as progress:
        bar = progress.add_task(f"decoding {label}", total=len(paths))
        pool = _pool_context().Pool(workers) if workers > 0 else None
        try:
            results = pool.imap(_decode_chunk, tasks) if pool is not None else map(_decode_chunk, tasks)
            # Results come in file order, so the error raised is the first bad file's.
            for start, chunk, chunk_bad, chunk_aspects in results:
                if chunk_bad and not skip_bad:
                    raise DataError(chunk_bad[0][1])
                out[start : start + len(chunk)] = chunk
                bad.extend(chunk_bad)
                if aspects is not None:
                    aspects.extend(chunk_aspects)
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


def warn_skipped(skipped: list[str], where: str) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} bad file(s) in {where} (first: {skipped[0]})", stacklevel=3)


def _warn_non_square(non_square: list, n: int, size: int, where: str) -> None:
    count, aspect = int(non_square[0]), float(non_square[1])
    if count:
        warnings.warn(
            f"{count} of {n} images in {where} are not square: the cache keeps each whole, resized to "
            f"{size}x{size}, so their aspect ratio changes (up to {aspect:.2f}:1); pass --image-size above "
            f"{MAX_CACHED_SIZE} to stream them with crops that keep it", stacklevel=3,
        )


def _cache_paths(cache_dir: Path, stem: str) -> tuple[Path, Path, Path]:
    """(images, labels, meta) files of one cache entry."""
    return cache_dir / f"{stem}.images.npy", cache_dir / f"{stem}.labels.npy", cache_dir / f"{stem}.json"


def _build_cache(
    scan: Scan, size: int, cache_dir: Path, stem: str, skip_bad: bool, workers: int | None
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
        aspects: list[float] = []
        bad = _decode_files(scan.files, size, out, skip_bad, workers, label=str(scan.split_dir), aspects=aspects)
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
            "non_square": [len(aspects), max(aspects, default=1.0)],
        }
        atomic_write_text(meta_path, json.dumps(meta))
        finish_temp(tmp, images_path)  # last: the images file existing means the cache entry is complete
    finally:
        tmp.unlink(missing_ok=True)
        _compact_path(tmp).unlink(missing_ok=True)
    return labels, skipped



def cache_stem(root: Path, split: str, scan: Scan, size: int, skip_bad: bool) -> str:
    digest = content_digest(root, split, scan, [CACHE_FORMAT, size, skip_bad])[:20]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.name)[:40]
    return f"{safe}-{split}-{size}px-{digest}"


def load_cached(
    root: Path, split: str, scan: Scan, size: int, cache_dir: Path, skip_bad: bool, name: str,
    fingerprint: str, workers: int | None = None,
) -> ArrayDataset:
    """The scanned split as an :class:`ArrayDataset` memory-mapped from the cache (built on first use)."""
    stem = cache_stem(root, split, scan, size, skip_bad)
    images_path, labels_path, meta_path = _cache_paths(cache_dir, stem)
    if images_path.exists() and labels_path.exists() and meta_path.exists():
        labels = np.load(labels_path)
        meta = json.loads(meta_path.read_text())
    else:
        labels, _ = _build_cache(scan, size, cache_dir, stem, skip_bad, workers)
        meta = json.loads(meta_path.read_text())
    skipped = meta.get("skipped", [])
    warn_skipped(skipped, str(scan.split_dir))
    _warn_non_square(meta.get("non_square", [0, 1.0]), len(labels), size, str(scan.split_dir))
    dataset = ArrayDataset(np.load(images_path, mmap_mode="r"), labels, scan.classes, name, fingerprint)
    gone = set(skipped)
    dataset.files = [f for f in scan.files if f not in gone]  # each row's file: portable subsets, subset lists
    return dataset
