"""WebDataset tar shards (``--data wds:DIR``): an index of every sample's bytes, read one sample at a time.

Layout (that of the published ImageNet-1k WebDataset copies): ``DIR`` holds ``.tar`` shards (at any
depth) whose names contain ``train``, and ``validation`` or ``val`` (else ``test``) for the held-out
split. A sample is the consecutive tar members that share a key (WebDataset's rule: the member's path up
to the first dot of its file name): ``KEY.jpg`` (or ``.jpeg``, ``.png``, ``.webp``, ...), ``KEY.cls`` (the
integer label as text) and optionally ``KEY.json``. Class names come from ``selfsup_shards.json``
(written by ``selfsup shard``, see :mod:`selfsup.data.shard_writer`) when present, else they are the
label range ``0 .. max label`` of the train shards.

Each shard is indexed once (tar headers, labels and JSON; images are skipped over, not read) into the
byte offset and length of every sample's image; the index is cached under the cache directory, keyed by
the shards' paths, sizes and modification times. A :class:`ShardStream` is then a map-style dataset like
:class:`~selfsup.data.stream.FolderStream` (one ``pread`` per sample), so shards get the folder path's
guarantees unchanged: the :class:`~selfsup.data.sampler.ResumableSampler` splits each epoch's
permutation by *sample* over nodes and ranks (shard counts need not divide evenly) and the DataLoader
splits it by batch over workers; no sample is read twice in an epoch; the order is drawn from
``seed + epoch``; a resumed run continues mid-epoch at the next unseen batch; crops come from
``(seed, epoch, index)``. WebDataset's own streaming pipeline splits by *shard* and resumes by
resampling, which gives none of these exactly.

Samples are ordered by key, compared path component by component (for shards written by
``selfsup shard`` the key is the image's path in the source folder, so the order is the folder's and
evaluation gives the same features in the same order as the folder). Compressed shards (``.tar.gz``)
cannot be read by offset and are refused with the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfsup.checkpoint import atomic_write
from selfsup.data.decode import IMAGE_EXTENSIONS, SKIP_HINT, decode_view
from selfsup.data.geometry import DEFAULT_CROP_PCT, WholeImage, draw_rng
from selfsup.data.stream import FolderStream
from selfsup.errors import DataError

META_NAME = "selfsup_shards.json"
"""The metadata ``selfsup shard`` writes beside its shards (classes, counts, max_resolution, source)."""

INDEX_FORMAT = 1  # bump when the index layout changes, so old cached indexes are not reused

IMAGE_EXTS = tuple(e.lstrip(".") for e in (".jpg", ".jpeg", ".png", ".webp")) + tuple(
    sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS - {".jpg", ".jpeg", ".png", ".webp"})
)
"""Members taken as a sample's image, in order of preference."""

_OPEN_LIMIT = 64  # shard files a process keeps open (ImageNet has 1,024 shards; ulimit -n is often 1,024)
_open: OrderedDict[str, int] = OrderedDict()
_open_pid = os.getpid()

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_FIX = "re-download or rewrite it (selfsup shard ROOT OUT redoes shards that are not complete)"


def _fd(path: str) -> int:
    """A read-only descriptor of ``path``, from this process's small LRU of open shards."""
    global _open_pid
    if _open_pid != os.getpid():  # a forked loader worker: the parent's descriptors are not ours to close
        _open.clear()
        _open_pid = os.getpid()
    fd = _open.get(path)
    if fd is not None:
        _open.move_to_end(path)
        return fd
    fd = _open[path] = os.open(path, os.O_RDONLY)
    while len(_open) > _OPEN_LIMIT:
        os.close(_open.popitem(last=False)[1])
    return fd


def split_key(member: str) -> tuple[str | None, str | None]:
    """``"a/b.seg.png"`` -> ``("a/b", "seg.png")``: WebDataset's key and extension of a tar member."""
    m = _KEY_RE.match(member)
    return (m.group(1), m.group(2)) if m else (None, None)


def shard_files(root: Path, split: str) -> list[Path]:
    """The ``.tar`` shards of a split under ``root``, sorted by path: names containing ``train``; for
    ``val``, names containing ``val`` (``validation`` too), else ``test``.

    Raises:
        DataError: ``root`` missing or not a directory, compressed shards, no shard of the split.
    """
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise DataError(f"shard folder {root} {what}: give wds:DIR, DIR holding WebDataset .tar shards")
    tars, packed = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts) or not path.is_file():
            continue
        if path.suffix == ".tar":
            tars.append(path)
        elif path.name.endswith((".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".tar.zst")):
            packed.append(path)
    if split == "train":
        found = [p for p in tars if "train" in p.relative_to(root).as_posix().lower()]
    else:
        names = [(p, p.relative_to(root).as_posix().lower()) for p in tars]
        found = [p for p, n in names if "val" in n and "train" not in n]
        found = found or [p for p, n in names if "test" in n and "train" not in n]
    if not found and packed:
        raise DataError(f"{packed[0]} is a compressed shard: selfsup reads samples by offset, which needs "
                        f"plain .tar files; decompress the shards (e.g. gunzip)")
    if not found:
        which = "'train'" if split == "train" else "'validation', 'val' or 'test'"
        seen = f" (its .tar files: {', '.join(p.name for p in tars[:3])}{', ...' if len(tars) > 3 else ''})" \
            if tars else " (it has no .tar files)"
        raise DataError(f"{root} has no shards with {which} in their names{seen}: name the shards "
                        f"like train-000000.tar and validation-000000.tar, or write them with selfsup shard")
    return found


def has_shard_split(root: Path, split: str) -> bool:
    """Whether ``root`` has shards of ``split`` (without raising)."""
    try:
        return bool(shard_files(root, split))
    except DataError:
        return False


def read_meta(root: Path) -> dict | None:
    """``selfsup_shards.json`` of a shard folder, or None when there is none."""
    path = root / META_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not readable JSON ({err}): rerun selfsup shard, or delete it to "
                        f"take the classes from the labels") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
        raise DataError(f"{path} has no 'classes' list: rerun selfsup shard, or delete it")
    return meta


# ---------------------------------------------------------------------------------------------- index


@dataclass
class _Sample:
    key: str
    offset: int = -1
    size: int = 0
    label: int | None = None
    label_text: str = ""
    path: str | None = None


def _index_shard(path: Path) -> tuple[list[_Sample], list[str]]:
    """Every sample of one shard (key, image offset and length, label), and messages about bad samples.

    Raises:
        DataError: not a tar file, or truncated.
    """
    try:
        file_size = path.stat().st_size
        tf = tarfile.open(path, "r:")
    except tarfile.ReadError as err:
        raise DataError(f"shard {path} is not a tar file ({err}): {_FIX}") from None
    samples: list[_Sample] = []
    problems: list[str] = []
    with tf:
        try:
            for member in tf:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > file_size:
                    raise DataError(f"shard {path} is truncated: member {member.name} ends at byte "
                                    f"{member.offset_data + member.size:,} of a {file_size:,}-byte file; {_FIX}")
                key, ext = split_key(member.name)
                if key is None or Path(member.name).name.startswith("."):
                    continue
                if not samples or samples[-1].key != key:
                    samples.append(_Sample(key))
                s, ext = samples[-1], ext.lower()
                if ext == "cls":
                    s.label_text = tf.extractfile(member).read().decode("utf-8", "replace").strip()
                elif ext == "json":
                    try:
                        info = json.loads(tf.extractfile(member).read())
                    except ValueError:
                        info = None
                    if isinstance(info, dict) and isinstance(info.get("path"), str):
                        s.path = info["path"]
                elif ext in IMAGE_EXTS and s.offset < 0:  # the first image member is the sample's image
                    s.offset, s.size = member.offset_data, member.size
            end = tf.offset
        except tarfile.TarError as err:
            raise DataError(f"shard {path} is damaged ({err}); {_FIX}") from None
    with open(path, "rb") as f:  # tarfile stops quietly at a cut-off header: what follows must be zeros
        f.seek(end)
        rest = f.read(1024)
    if rest.strip(b"\0"):
        raise DataError(f"shard {path} is truncated or damaged after byte {end:,} (a tar header is cut off); {_FIX}")
    for s in samples:
        if s.offset < 0:
            problems.append(f"sample {s.key!r} in shard {path} has no image ({', '.join('.' + e for e in IMAGE_EXTS[:4])})")
        try:
            s.label = int(s.label_text)
        except ValueError:
            what = "no label (.cls)" if not s.label_text else f"label {s.label_text[:20]!r}, not an integer"
            raise DataError(f"sample {s.key!r} in shard {path} has {what}: every sample needs KEY.cls holding "
                            f"its class index; {_FIX}") from None
    return samples, problems


def _file_stamp(paths: list[Path], root: Path) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return out


@dataclass
class ShardIndex:
    """Every sample of a split, ordered by key: its shard, image offset and length, label and key."""

    shards: list[str]
    shard: np.ndarray  # (N,) int32 index into shards
    offset: np.ndarray  # (N,) int64
    size: np.ndarray  # (N,) int64
    label: np.ndarray  # (N,) int64
    keys: np.ndarray  # (N,) bytes (utf-8)
    skipped: list[str]
    fingerprint: str


def _sort_key(key: str) -> list[str]:
    return key.split("/")  # component by component: a folder walk's order


def build_index(root: Path, split: str, cache_dir: Path, skip_bad: bool = False) -> ShardIndex:
    """Index (or read the cached index of) the shards of one split.

    Raises:
        DataError: a shard that is not a tar or is truncated, a sample without a label, a sample without
            an image (unless ``skip_bad``), a key that appears twice.
    """
    paths = shard_files(root, split)
    stamp = _file_stamp(paths, root)
    digest = hashlib.sha256(json.dumps([INDEX_FORMAT, str(root), split, stamp]).encode()).hexdigest()
    cached = cache_dir / "shard-index" / f"{digest}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                skipped = json.loads(str(z["skipped"]))
                if skipped and not skip_bad:
                    raise DataError(skipped[0] + f"; {SKIP_HINT}")
                return ShardIndex([str(root / s[0]) for s in stamp], z["shard"], z["offset"], z["size"],
                                  z["label"], z["keys"], skipped, digest)
        except (OSError, ValueError, KeyError):
            cached.unlink(missing_ok=True)  # damaged: index again
    results = _index_all(paths, root)
    rows, skipped = [], []
    for sid, (samples, problems) in enumerate(results):
        if problems and not skip_bad:
            raise DataError(problems[0] + f"; {SKIP_HINT}")
        skipped.extend(problems)
        rows.extend((s.path or s.key, sid, s.offset, s.size, s.label) for s in samples if s.offset >= 0)
    rows.sort(key=lambda r: _sort_key(r[0]))
    for a, b in zip(rows, rows[1:], strict=False):
        if a[0] == b[0]:
            raise DataError(f"sample key {a[0]!r} appears twice (shards {paths[a[1]]} and {paths[b[1]]}): "
                            f"keys must be unique within a split")
    index = ShardIndex(
        [str(p) for p in paths],
        np.asarray([r[1] for r in rows], dtype=np.int32),
        np.asarray([r[2] for r in rows], dtype=np.int64),
        np.asarray([r[3] for r in rows], dtype=np.int64),
        np.asarray([r[4] for r in rows], dtype=np.int64),
        np.asarray([r[0].encode() for r in rows], dtype=np.bytes_) if rows else np.zeros(0, "S1"),
        skipped, digest,
    )
    try:
        with atomic_write(cached) as f:
            np.savez(f, shard=index.shard, offset=index.offset, size=index.size, label=index.label,
                     keys=index.keys, skipped=np.asarray(json.dumps(skipped)))
    except OSError as err:  # a read-only cache only costs indexing again next time
        warnings.warn(f"could not cache the shard index in {cached.parent} ({err.strerror or err})", stacklevel=2)
    return index


def _index_all(paths: list[Path], root: Path) -> list[tuple[list[_Sample], list[str]]]:
    """Index shards in a thread pool (reads are I/O), with a progress bar counting shards."""
    from selfsup.progress import make_progress

    with make_progress(transient=True, enabled=len(paths) > 1) as progress:
        bar = progress.add_task(f"indexing shards of {root}", total=len(paths))
        out = []
        with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
            for result in pool.map(_index_shard, paths):
                out.append(result)
                progress.advance(bar)
    return out


# ---------------------------------------------------------------------------------------------- dataset


class ShardStream(FolderStream):
    """Samples of WebDataset shards, decoded one view at a time in DataLoader workers.

    Everything a :class:`~selfsup.data.stream.FolderStream` does (training crops, evaluation crops,
    device decode, skipping bad images) with a sample's bytes read from its shard instead of a file.
    ``files`` holds the samples' keys. ``whole`` makes evaluation views whole images resized to ``S``
    (the small-image rule of folders: images of at most 96 px are evaluated uncropped).

    Shape:
        - ``self[i]``: ``((3, S, S) uint8, int)``
    """

    def __init__(self, index: ShardIndex, classes: list[str], image_size: int, name: str,
                 skip_bad: bool = False, crop_pct: float = DEFAULT_CROP_PCT, whole: bool = False) -> None:
        keys = [k.decode() for k in index.keys]
        super().__init__(keys, index.label, classes, image_size, name, skip_bad=skip_bad,
                         fingerprint=index.fingerprint, crop_pct=crop_pct)
        self.shards = index.shards
        self.shard_of, self.offsets, self.sizes = index.shard, index.offset, index.size
        self.whole = bool(whole)
        if self.whole:
            self.eval_crop = WholeImage(self.image_size)

    @property
    def transform(self) -> str:
        if self.whole:  # what cached folders record for the same whole-image views
            from selfsup.eval.features import TRANSFORM_ID

            return TRANSFORM_ID
        return super().transform

    def sample_name(self, i: int) -> str:
        """What messages call sample ``i``: its shard and key."""
        return f"sample {self.files[i]!r} of shard {self.shards[int(self.shard_of[i])]}"

    def read_bytes(self, i: int) -> bytes:
        """The encoded image of sample ``i`` (one ``pread`` from its shard)."""
        path = self.shards[int(self.shard_of[i])]
        try:
            data = os.pread(_fd(path), int(self.sizes[i]), int(self.offsets[i]))
        except OSError as err:
            raise DataError(f"shard {path} cannot be read ({err.strerror or err})") from None
        if len(data) != int(self.sizes[i]):
            raise DataError(f"shard {path} is truncated: {self.sample_name(i)} ends past the end of the file "
                            f"(it changed after indexing?); {_FIX}")
        return data

    def view(self, i: int, epoch: int = 0) -> torch.Tensor:
        rng = None if self.train_crop is None else draw_rng(self.seed, epoch, i)
        place = self.eval_crop if self.train_crop is None else self.train_crop
        return decode_view(self.read_bytes(i), place, rng, name=self.sample_name(i))

    def _read(self, i: int, epoch: int) -> tuple:
        data = self.read_bytes(i)
        place = self.eval_crop if self.train_crop is None else self.train_crop
        item = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        return item, int(self.labels[i]), (epoch, i), self.sample_name(i), place, self.seed, self.skip_bad

    def __repr__(self) -> str:
        mode = "eval" if self.train_crop is None else "train"
        return (f"ShardStream({self.name!r}, n={len(self)}, shards={len(self.shards)}, size={self.image_size}, "
                f"classes={len(self.classes)}, {mode})")


def _classes(root: Path, meta: dict | None, train: ShardIndex) -> list[str]:
    if not len(train.label):
        raise DataError(f"the train shards of {root} hold no samples")
    return [str(i) for i in range(int(train.label.max()) + 1)]


def _check_labels(index: ShardIndex, classes: list[str], where: str) -> None:
    bad = np.flatnonzero((index.label < 0) | (index.label >= len(classes)))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"sample {index.keys[i].decode()!r} in shard {index.shards[int(index.shard[i])]} has label "
            f"{int(index.label[i])}, outside the {len(classes)} classes {where} (0..{len(classes) - 1}): "
            f"fix its .cls, or the classes in {META_NAME}")


def _check_counts(root: Path, meta: dict | None, split: str, index: ShardIndex) -> None:
    if meta is None:
        return
    expected = ((meta.get("splits") or {}).get(split) or {}).get("samples")
    found = len(index.label) + len(index.skipped)
    if isinstance(expected, int) and expected != found:
        raise DataError(f"the {split} shards of {root} hold {found} samples but {META_NAME} says {expected}: a "
                        f"shard is missing or incomplete; rerun selfsup shard to complete them")


def _infer_size(stream: ShardStream, sample: int = 200) -> int:
    """The most common shorter side over ``sample`` images' headers (if at most 96), else 224."""
    from PIL import Image

    from selfsup.data.cache import MAX_CACHED_SIZE
    from selfsup.data.datasets import DEFAULT_STREAM_SIZE

    sides: Counter[int] = Counter()
    n = len(stream)
    for i in sorted({int(j) for j in np.linspace(0, n - 1, min(n, sample))}):
        try:
            with Image.open(io.BytesIO(stream.read_bytes(i))) as image:
                sides[min(image.size)] += 1
        except (OSError, ValueError, DataError):
            continue
    if not sides:
        raise DataError(f"no readable image in {stream.name}")
    side = max(sides, key=lambda s: (sides[s], s))
    return side if side <= MAX_CACHED_SIZE else DEFAULT_STREAM_SIZE


def load_shards(root: Path, split: str, image_size: int | None, cache_dir: Path, skip_bad: bool = False,
                crop_pct: float | None = None) -> ShardStream:
    """A split of a shard folder as a :class:`ShardStream` (see :func:`~selfsup.data.datasets.load_dataset`)."""
    from selfsup.data.cache import MAX_CACHED_IMAGES, MAX_CACHED_SIZE

    meta = read_meta(root)
    index = build_index(root, "train" if split == "train" else split, cache_dir, skip_bad)
    if meta is not None:
        classes = [str(c) for c in meta["classes"]]
    else:  # the label range of the train shards
        classes = _classes(root, None, index if split == "train" else build_index(root, "train", cache_dir, skip_bad))
    where = f"of {META_NAME}" if meta is not None else "the train shards' labels give"
    _check_labels(index, classes, where)
    _check_counts(root, meta, "train" if split == "train" else "val", index)
    for msg in index.skipped[:1]:
        warnings.warn(f"skipped {len(index.skipped)} bad sample(s) in the {split} shards of {root} (first: {msg})",
                      stacklevel=3)
    name = f"wds:{root}"
    crop = DEFAULT_CROP_PCT if crop_pct is None else crop_pct
    if image_size is None:
        image_size = _infer_size(ShardStream(index, classes, 1, name, skip_bad=skip_bad, crop_pct=crop))
    whole = image_size <= MAX_CACHED_SIZE and len(index.label) <= MAX_CACHED_IMAGES
    return ShardStream(index, classes, image_size, name, skip_bad=skip_bad, crop_pct=crop, whole=whole)
