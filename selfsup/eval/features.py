"""Extract features once with a frozen encoder and cache them; every probe, kNN and sweep reads the cache.

Extraction runs the encoder in eval mode (norm layers included), without augmentation: a plain loop on
the CPU or one GPU (no Lightning is imported), or Lightning's ``Trainer.predict`` on many GPUs / nodes
with DDP (:mod:`selfsup.eval.distributed_features`). Each rank writes its rows with their dataset indices
to a shard file; rank 0 assembles them in dataset order, so the result is identical to a single process.
(Multi-node extraction needs the cache directory on a filesystem all nodes share, as checkpoints do.)

The cache is one safetensors file per (encoder weights, encoder config, dataset, split, image size,
transform, dtype); its name is a hash of all of them, so changed weights are a cache miss. Reading
memory-maps the file, so an ImageNet-size cache (1.28M x 2048) never has to fit in RAM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selfsup.checkpoint import clean_stale_temp_files, disk_full, finish_temp, no_space_error, reserve_space
from selfsup.data.datasets import batch_collate, load_dataset
from selfsup.errors import ConfigError
from selfsup.names import name_bytes

TRANSFORM_ID = "resize-centre-crop/no-augmentation/v1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class Features:
    """Cached features of one dataset split: ``x`` (N, D) and ``y`` (N,) in dataset order (memory-mapped)."""

    x: np.ndarray
    y: np.ndarray
    path: Path
    meta: dict

    def __len__(self) -> int:
        return len(self.y)


def sample_keys(dataset) -> list[str] | None:
    """Each row's image path relative to the data root (``/``-separated), or None for data without files.

    Samples of shards (``wds:``) are keyed by their WebDataset key, or by the source path that
    ``selfsup shard`` records in each sample's JSON (the same key as the folder it came from).

    The key of an image does not depend on where the data lives or the order it is listed in, so
    subsets drawn by key (and subset lists such as ImageNet's 1% / 10% files) are portable.
    """
    files = getattr(dataset, "files", None)
    name = str(getattr(dataset, "name", ""))
    if files is not None and name.startswith("wds:"):  # shards: each sample's key (its source path, if known)
        return list(files)
    if files is None or not name.startswith("folder:"):
        return None
    root = name[len("folder:"):]
    return [os.path.relpath(f, root).replace(os.sep, "/") for f in files]


def data_fingerprint(dataset, keys: list[str] | None = None) -> str:
    """A location-free SHA-256 of a split: its kind, size, class names, labels and image keys (relative paths)."""
    h = hashlib.sha256()
    name = str(getattr(dataset, "name", type(dataset).__name__))
    h.update(name.split(":", 1)[0].encode())  # "folder:/data/imagenet" -> "folder": not the location
    h.update(str(len(dataset)).encode())
    h.update(json.dumps(list(getattr(dataset, "classes", []))).encode())
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes())
    for key in keys or ():
        h.update(name_bytes(key) + b"\n")
    return h.hexdigest()


def _cache_of(encoder: nn.Module) -> Path:
    """The run's own feature cache (where the CLI put it) for an encoder loaded from a run, else the default."""
    source = getattr(encoder, "source_dir", None)
    if source is not None:
        run = Path(source).parent if Path(source).name == "export" else None
        if run is not None and (run / "config.yaml").is_file():
            return run / "features"
    return default_cache_dir()


def default_cache_dir() -> Path:
    return Path(os.environ.get("SELFSUP_CACHE", Path.home() / ".cache" / "selfsup")) / "features"


def encoder_fingerprint(encoder: nn.Module) -> str:
    """Hash of an encoder's weights and buffers (and its config when it has one)."""
    h = hashlib.sha256()
    h.update(type(encoder).__qualname__.encode())
    config = getattr(encoder, "config", None)
    if config is not None:
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_safetensors_mmap(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-map every tensor of a safetensors file as a read-only numpy array, plus its metadata."""
    path = Path(path)
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    np_types = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "BF16": None}
    arrays = {}
    for name, info in header.items():
        dtype = np_types.get(info["dtype"])
        if dtype is None:
            raise ConfigError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if count == 0:
            arrays[name] = np.zeros(info["shape"], dtype)
            continue
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=tuple(info["shape"]))
        if (end - start) != count * np.dtype(dtype).itemsize:
            raise ConfigError(f"{path}: tensor {name!r} is truncated; delete the file to re-extract")
    return arrays, meta


class _Indexed(torch.utils.data.Dataset):
    """Wraps a dataset so every sample carries its index: ``(index, image, label)``."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, label = self.dataset[i]
        return i, img, label

    def __getitems__(self, indices: list[int]):
        if hasattr(self.dataset, "__getitems__"):
            imgs, labels = self.dataset.__getitems__(indices)
            return torch.as_tensor(indices), imgs, labels
        return [self[i] for i in indices]


def _cache_key(encoder: nn.Module, dataset, split: str, dtype: str) -> tuple[str, dict]:
    meta = {
        "encoder": encoder_fingerprint(encoder),
        "dataset": str(getattr(dataset, "name", type(dataset).__name__)),
        "split": split,
        "n": str(len(dataset)),
        # the data's content (files' paths, sizes, mtimes), so replaced images are a cache miss
        "data_fingerprint": str(getattr(dataset, "fingerprint", "")),
        "image_size": str(getattr(dataset, "image_size", "")),
        "transform": getattr(dataset, "transform", TRANSFORM_ID),  # streamed folders say their crop_pct
        "dtype": dtype,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    return key, meta


def extract_features(
    encoder: nn.Module,
    data,
    split: str = "train",
    *,
    batch_size: int = 256,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    dtype: str = "float32",
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    num_workers: int | None = None,
    refresh: bool = False,
    progress: bool = True,
    name: str | None = None,
    layers: str | list[str] | None = None,
) -> Features | dict[str, Features]:
    """Features of every image of ``data``'s ``split``, in dataset order, from the cache when present.

    Args:
        encoder: module mapping RGB images in [0, 1] (or uint8) ``(B, 3, H, W)`` to ``(B, D)``, e.g.
            from :func:`selfsup.load_encoder`.
        data: a dataset spec (``"digits"``, ``"cifar10:ROOT"``, a folder) or a dataset yielding
            ``(uint8 image, label)`` with a ``name`` attribute (used in the cache key).
        split: ``"train"`` or ``"val"`` (a folder's ``val``/``test``; a torchvision dataset's test split).
        image_size: resize the data to this square size (default: the data's own).
        cache_dir: where the cache lives (default: the run's ``features/`` for an encoder loaded from a
            run, so the features ``selfsup probe`` cached are reused; else ``$SELFSUP_CACHE/features``).
        dtype: storage dtype, ``"float32"`` or ``"float16"``.
        accelerator, devices, num_nodes, strategy: Lightning Trainer settings (``strategy="ddp"``
            with ``devices=2`` extracts with two processes).
        refresh: re-extract even when the cache holds these features.
        progress: show a bar labelled with the encoder, the split and the number of images.
        name: what the bar calls the encoder (default: :func:`encoder_name`).
        layers: layer-wise features (:mod:`selfsup.eval.layers`): ``"all"``, ``"last"``, or names / 0-based
            stage indices (``"2,3,4"``, ``["layer3", "out"]``). Every selected stage is read in one forward
            pass, average-pooled to about 9,000 dimensions (Goyal et al. 2019) and cached in a file of its
            own (the pooling is in its metadata); a layer already cached is not extracted again.

    Returns:
        :class:`Features` with memory-mapped ``x`` (N, D) and ``y`` (N,); with ``layers``, a dict of them
        by layer name, in stage order.

    >>> enc = selfsup.load_encoder("runs/my-run")  # doctest: +SKIP
    >>> run_data = enc.config.get("data", {}).get("data")  # the run's own data  # doctest: +SKIP
    >>> feats = selfsup.extract_features(enc, run_data, layers="all")  # doctest: +SKIP
    >>> {name: f.x.shape for name, f in feats.items()}  # doctest: +SKIP
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    trained_on = (getattr(encoder, "config", None) or {}).get("data") or {}
    if isinstance(data, (str, Path)):
        if image_size is None and str(data) == trained_on.get("data"):
            image_size = trained_on.get("image_size")  # the run's size: the features `selfsup probe` cached
        crop_pct = trained_on.get("crop_pct") if str(data) == trained_on.get("data") else None
        dataset = load_dataset(str(data), split=split, image_size=image_size, crop_pct=crop_pct)
    else:
        dataset = data
    warn_if_other_images(encoder, dataset)
    cache_dir = Path(cache_dir) if cache_dir is not None else _cache_of(encoder)
    clean_stale_temp_files(cache_dir)  # what a killed extraction left behind
    run = dict(split=split, batch_size=batch_size, dtype=dtype, cache_dir=cache_dir, num_workers=num_workers,
               progress=progress, label=name or encoder_name(encoder),
               trainer_kw=dict(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy))
    if layers is not None:
        return _extract_layers(encoder, dataset, layers, refresh, **run)
    key, meta = _cache_key(encoder, dataset, split, dtype)
    path = cache_dir / f"{key}.safetensors"
    if not refresh and _cached(path):
        return _load(path)
    dim = encoder_dim(encoder)
    _extract(encoder, dataset, key, lambda: _CacheWriter(path, len(dataset), dim, dtype, meta), **run)
    return _load(path)


def _cached(path: Path) -> bool:
    """Whether the cache file ``path`` is there and whole (:func:`check_cache_file`); a damaged one is removed
    with a one-line note, so that it is extracted again."""
    if not path.is_file():
        return False
    damage = check_cache_file(path)
    if damage is None:
        return True
    print(f"selfsup: note: feature cache {path} is damaged ({damage}); extracting again", file=sys.stderr)
    path.unlink(missing_ok=True)
    return False


def _extract_layers(encoder: nn.Module, dataset, layers, refresh: bool, **run) -> dict[str, Features]:
    """:func:`extract_features` of several layers: one pass for the layers not cached yet, one file per layer."""
    from selfsup.eval.layers import LAST, POOLING_ID, LayerEncoder, LayerPlan, plan_layers

    image = dataset[0][0]  # (C, H, W) uint8 or float: the data's own size
    plan = plan_layers(encoder, tuple(image.shape), layers)
    split, dtype, cache_dir = run["split"], run["dtype"], run["cache_dir"]
    files: dict[str, tuple[Path, dict]] = {}
    for layer in plan.names:
        key, meta = _cache_key(encoder, dataset, split, dtype)
        if layer != LAST:  # the encoder's own output is the plain cache file, shared with `selfsup probe`
            extra = {"layer": layer, "pooling": plan.pooling(layer), "pooling_id": POOLING_ID}
            key = hashlib.sha256(json.dumps({**meta, **extra}, sort_keys=True).encode()).hexdigest()[:24]
            meta = {**meta, **extra}
        files[layer] = (cache_dir / f"{key}.safetensors", meta)
    todo = [n for n in plan.names if refresh or not _cached(files[n][0])]  # a damaged layer file is extracted again
    if todo:
        sub = LayerPlan(todo, {n: plan.grids[n] for n in todo}, {n: plan.dims[n] for n in todo}, plan.available)
        n = len(dataset)

        def writer() -> _MultiWriter:
            return _MultiWriter([_CacheWriter(files[t][0], n, sub.dims[t], dtype, files[t][1]) for t in todo])

        key = hashlib.sha256(name_bytes("".join(str(files[t][0]) for t in todo))).hexdigest()[:24]
        shown = ", ".join(todo) if len(todo) <= 4 else f"{len(todo)} layers"
        run["label"] = f"{run['label']} [{shown}]"
        _extract(LayerEncoder(encoder, sub), dataset, key, writer, **run)
    return {layer: _load(files[layer][0]) for layer in plan.names}


def _extract(
    encoder: nn.Module, dataset, key: str, make_writer, *, split: str, batch_size: int, dtype: str, cache_dir: Path,
    num_workers: int | None, progress: bool, label: str, trainer_kw: dict,
) -> None:
    """Run ``encoder`` over ``dataset`` and stream the rows into ``make_writer()``: a plain loop on one device,
    or with several devices or nodes (``trainer_kw``), Lightning's ``Trainer.predict`` under DDP
    (:mod:`selfsup.eval.distributed_features`)."""
    loader = torch.utils.data.DataLoader(
        _Indexed(dataset), batch_size=batch_size, shuffle=False, collate_fn=batch_collate,
        num_workers=_workers(dataset, num_workers), pin_memory=torch.cuda.is_available(),
    )
    description = f"extract {label} {split} ({len(dataset):,} images)"
    device = single_device(**trainer_kw)
    if device is None:
        from selfsup.eval.distributed_features import extract_distributed

        extract_distributed(encoder, loader, len(dataset), key, make_writer, dtype=_DTYPES[dtype],
                            cache_dir=cache_dir, description=description if progress else None,
                            trainer_kw=trainer_kw)
        return
    from selfsup.progress import make_progress

    home = next((t.device for t in [*encoder.parameters(), *encoder.buffers()]), torch.device("cpu"))
    was_training = encoder.training
    encoder.to(device).eval()
    writer = make_writer()
    bar = make_progress(enabled=progress)
    try:
        with bar, torch.inference_mode():
            task = bar.add_task(description, total=len(dataset))
            for idx, images, labels in loader:
                feats = check_features(encoder(images.to(device, non_blocking=True)).float())
                writer.write(idx.cpu(), feats.to(_DTYPES[dtype]).cpu(), labels.cpu())
                bar.advance(task, len(idx))
        writer.close()
    except BaseException:  # an error, Ctrl-C or SIGTERM: the half-filled file goes now, not at the next run
        writer.discard()
        raise
    finally:
        encoder.to(home).train(was_training)


def single_device(accelerator: str = "auto", devices=1, num_nodes: int = 1, strategy: str = "auto") -> torch.device | None:
    """The one device a plain loop extracts on, or None where the settings ask for several processes (DDP).

    As Lightning picks: ``auto`` is the first CUDA GPU, else Apple's MPS, else the CPU; ``devices=1`` the
    first device of the kind, ``[i]`` device ``i``. Several devices or nodes, a strategy other than
    ``auto``, or a process started by a distributed launcher (``WORLD_SIZE`` > 1) give None.
    """
    if num_nodes != 1 or strategy not in ("auto", None) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    index = None
    if isinstance(devices, (list, tuple)):
        if len(devices) != 1:
            return None
        index = int(devices[0])
    elif devices != "auto" and str(devices).strip() not in ("1", "1,"):
        return None
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if devices == "auto" and torch.cuda.device_count() > 1:
            return None
        return torch.device("cuda", index or 0)
    return torch.device(accelerator) if accelerator in ("cpu", "mps") else None


def check_features(feats: torch.Tensor) -> torch.Tensor:
    """``feats`` if they are ``(B, D)`` and finite, else a one-line ``ConfigError``."""
    if feats.ndim != 2:
        raise ConfigError(f"the encoder must return (B, D) features, got shape {tuple(feats.shape)}")
    if not torch.isfinite(feats).all():
        raise ConfigError("the encoder produced NaN or infinite features")
    return feats


def encoder_name(encoder: nn.Module) -> str:
    """A short name of an encoder: ``method-backbone`` from an exported run's config, ``pixels 16px``, or its class."""
    config = getattr(encoder, "config", None) or {}
    if config.get("method"):
        backbone = (config.get("hparams") or {}).get("backbone")
        return f"{config['method']}-{backbone}" if backbone else str(config["method"])
    if "pixels" in config:
        return f"pixels {config['pixels']}px"
    return type(encoder).__name__


def encoder_dim(encoder: nn.Module) -> int:
    """Feature size of an encoder: its ``num_features``."""
    dim = getattr(encoder, "num_features", None)
    if not isinstance(dim, int):
        raise ConfigError(f"{type(encoder).__name__} has no integer num_features attribute")
    return dim


def _workers(dataset, num_workers: int | None) -> int:
    if num_workers is not None:
        return num_workers
    return 0 if hasattr(dataset, "__getitems__") else min(8, os.cpu_count() or 1)


class _CacheWriter:
    """Streams rows into a preallocated, memory-mapped safetensors file at their dataset index.

    The file is a valid safetensors file (header, then ``features`` (N, D) and ``labels`` (N,)); it is
    written under a temporary name and renamed when every row has arrived, so a crash never leaves a
    half-written cache behind, and memory use does not grow with the dataset.
    """

    def __init__(self, path: Path, n: int, dim: int, dtype: str, meta: dict) -> None:
        np_dtype = np.dtype(np.float16 if dtype == "float16" else np.float32)
        feat_bytes = n * dim * np_dtype.itemsize
        header = {
            "__metadata__": {**meta, "num_features": str(dim), CHECK_KEY: _CHECK_PLACEHOLDER},
            "features": {"dtype": "F16" if dtype == "float16" else "F32", "shape": [n, dim],
                         "data_offsets": [0, feat_bytes]},
            "labels": {"dtype": "I64", "shape": [n], "data_offsets": [feat_bytes, feat_bytes + 8 * n]},
        }
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path, self.n = path, n
        self.header = struct.pack("<Q", len(raw)) + raw
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        total = 8 + len(raw) + feat_bytes + 8 * n
        try:
            with self.tmp.open("wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(total)
                reserve_space(f.fileno(), total)  # a sparse map on a full disk dies of SIGBUS when written
        except OSError as err:
            self.tmp.unlink(missing_ok=True)
            if disk_full(err, path, total):
                raise no_space_error(path, total) from None
            raise
        start = 8 + len(raw)
        self.features = np.memmap(self.tmp, dtype=np_dtype, mode="r+", offset=start, shape=(n, dim))
        self.labels = np.memmap(self.tmp, dtype=np.int64, mode="r+", offset=start + feat_bytes, shape=(n,))
        self.seen = np.zeros(n, dtype=bool)

    def write(self, idx: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor) -> None:
        rows = idx.numpy()
        self.features[rows] = feats.numpy()
        self.labels[rows] = labels.long().numpy()
        self.seen[rows] = True  # a padded sampler may send a row twice: same values, written twice

    def discard(self) -> None:
        """Remove the unfinished file (extraction stopped)."""
        with contextlib.suppress(AttributeError):
            del self.features, self.labels
        self.tmp.unlink(missing_ok=True)

    def close(self) -> None:
        missing = int((~self.seen).sum())
        self.features.flush()
        self.labels.flush()
        del self.features, self.labels
        if missing:
            self.tmp.unlink()
            raise RuntimeError(f"feature extraction missed {missing} of {self.n} images")
        with self.tmp.open("rb+") as f:  # the checksum of the header and labels, into its placeholder
            check = _checksum(self.header, _read_labels(f, self.header))
            f.seek(self.header.index(_CHECK_PLACEHOLDER.encode()))
            f.write(check.encode())
        finish_temp(self.tmp, self.path)  # fsync + rename: a crash never leaves a half-written cache file


CHECK_KEY = "check_sha256"
_CHECK_PLACEHOLDER = "0" * 64


def _checksum(header: bytes, labels: bytes) -> str:
    """sha256 of a cache file's header (its checksum field as the placeholder) and its labels: a cheap check
    (the features themselves are not read) that catches a truncated, cut or edited file."""
    return hashlib.sha256(header + labels).hexdigest()


def _read_labels(f, header: bytes) -> bytes:
    info = json.loads(header[8:])["labels"]
    start, end = info["data_offsets"]
    f.seek(len(header) + start)
    return f.read(end - start)


def check_cache_file(path: str | Path) -> str | None:
    """Why a feature-cache file cannot be used (truncated, header unreadable, sizes or checksum wrong), or None.

    Reads the header and the labels only: the file's size must be exactly the header's plus the tensors'
    bytes, and a file written with a checksum (:data:`CHECK_KEY`) must match it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"header of {n} bytes in a file of {size}"
            raw = f.read(n)
            header = json.loads(raw)
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
            if 8 + n + end != size:
                return f"{size} bytes where its header needs {8 + n + end}"
            if set(tensors) != {"features", "labels"}:
                return f"tensors {sorted(tensors)}, not features and labels"
            meta = header.get("__metadata__") or {}
            want = meta.get(CHECK_KEY)
            if want is None:
                return None  # written before checksums: sizes only
            plain = head + raw.replace(want.encode(), _CHECK_PLACEHOLDER.encode(), 1)
            if _checksum(plain, _read_labels(f, plain)) != want:
                return "its header or labels do not match their checksum"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"unreadable: {err}"
    return None


class _MultiWriter:
    """Splits each row's columns over several :class:`_CacheWriter` (one file per layer, in order)."""

    def __init__(self, writers: list[_CacheWriter]) -> None:
        self.writers = writers
        self.bounds = np.cumsum([0] + [w.features.shape[1] for w in writers]).tolist()

    def write(self, idx: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor) -> None:
        for w, lo, hi in zip(self.writers, self.bounds[:-1], self.bounds[1:], strict=True):
            w.write(idx, feats[:, lo:hi], labels)

    def close(self) -> None:
        for w in self.writers:
            w.close()

    def discard(self) -> None:
        for w in self.writers:
            w.discard()


def warn_if_other_images(encoder: nn.Module, dataset) -> None:
    """Warn once when an encoder trained on data of one image size or channel count is given another's."""
    import warnings

    trained = (getattr(encoder, "config", None) or {}).get("data") or {}
    size, shape = trained.get("image_size"), None
    try:
        shape = tuple(dataset[0][0].shape)  # (C, H, W)
    except Exception:  # noqa: BLE001 - a dataset without indexable images: nothing to compare
        return
    channels = trained.get("channels", 3) if trained else None  # selfsup encoders take RGB
    problems = []
    if size and len(shape) == 3 and int(size) != int(shape[-1]):
        problems.append(f"{shape[-1]} px images, the encoder was trained on {size} px")
    if channels and len(shape) == 3 and int(channels) != int(shape[0]):
        problems.append(f"{shape[0]} channels, the encoder was trained on {channels}")
    if problems:
        data = trained.get("data") or "its training data"
        warnings.warn(f"{getattr(dataset, 'name', 'the data')} has {' and '.join(problems)} ({data}); "
                      "its features may be meaningless (pass the run's own data, or image_size=)", stacklevel=3)


def _load(path: Path) -> Features:
    arrays, meta = read_safetensors_mmap(path)
    return Features(x=arrays["features"], y=np.asarray(arrays["labels"]), path=path, meta=meta)
