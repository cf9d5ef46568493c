"""``selfsup shard ROOT OUT``: WebDataset tar shards from an ImageNet-layout folder, atomically and resumably.

Writes ``OUT/train-000000.tar, ...`` and ``OUT/validation-000000.tar, ...`` (the folder's ``val``, or
``test``, split) in the layout :mod:`selfsup.data.shards` reads and WebDataset pipelines stream: each
sample is ``KEY.<ext>`` (the image's bytes, unchanged unless re-encoded), ``KEY.cls`` (the class index as
text) and ``KEY.json`` (``path``: the image's path relative to ``ROOT``, so shards and folder key their
samples alike; ``class``, and the original ``width``/``height``). Train samples are shuffled once (a fixed
seed) before they are cut into shards, so a streaming reader that takes shards in order still sees mixed
classes; validation keeps the folder's order.

``max_resolution`` (FFCV's ``max_resolution``) caps the longer side: an image larger than that is
decoded, resized (PIL, Lanczos) and re-encoded (JPEG at quality :data:`JPEG_QUALITY` when it was a JPEG,
else PNG); smaller images are copied byte for byte.

Every shard is written to a temporary name and renamed when complete, so a shard file that exists is
whole. A plan (``.selfsup_shard_plan.json``: the source's fingerprint and the options) is written first;
a rerun with the same plan keeps the shards that exist and writes the rest (a shard cut short by a crash
is redone); a different source or options in a folder that holds shards is refused, never overwritten.
``selfsup_shards.json`` (classes, samples per split, shards, max_resolution, the source fingerprint) is
written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from pathlib import Path

import numpy as np

from selfsup.checkpoint import atomic_write, atomic_write_text, clean_stale_temp_files
from selfsup.data.cache import _POOL_MIN_IMAGES, _pool_context, num_cpus
from selfsup.data.decode import to_rgb
from selfsup.data.scan import Scan, split_dir_of
from selfsup.data.shards import META_NAME
from selfsup.errors import ConfigError, DataError

PLAN_NAME = ".selfsup_shard_plan.json"
JPEG_QUALITY = 90
"""Quality of re-encoded JPEGs (FFCV's default)."""

DEFAULT_SHARD_SIZE = "1000"
SPLIT_NAMES = {"train": "train", "val": "validation"}
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_shard_size(text: str) -> tuple[int | None, int | None]:
    """``"1000"`` -> ``(1000, None)`` samples per shard; ``"500MB"`` -> ``(None, 500_000_000)`` bytes.

    Raises:
        ConfigError: not a positive count or size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--shard-size must be a number of samples (1000) or bytes (500MB, 1GB), got {text!r}")
    if m.group(2) is None:
        if not m.group(1).isdigit():
            raise ConfigError(f"--shard-size in samples must be a whole number, got {text!r}")
        return int(m.group(1)), None
    return None, int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _key(rel: str, taken: set[str]) -> str:
    """A WebDataset key from a path inside a split: no extension, no dots (WebDataset splits at the first)."""
    key = re.sub(r"[^A-Za-z0-9_/-]", "_", rel.rsplit(".", 1)[0])
    base, n = key, 1
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    taken.add(key)
    return key


def _plan(root: Path, skip_bad: bool, seed: int, samples: int | None, max_bytes: int | None) -> dict:
    """Which images go to which shard, from the folder's listing alone (so a rerun makes the same plan)."""
    splits = {}
    for split in ("train", "val"):
        if split == "val" and split_dir_of(root, "val") is None:
            continue
        scan = Scan(root, split)
        if scan.bad and not skip_bad:
            raise DataError(scan.bad[0][1])
        order = np.arange(len(scan.files))
        if split == "train":
            order = np.random.default_rng(seed).permutation(len(scan.files))
        taken: set[str] = set()
        items = []
        for i in order.tolist():
            rel = scan.fingerprint[i][0].replace("\\", "/")  # relative to root
            inside = rel.split("/", 1)[1]  # relative to the split directory
            items.append({"path": rel, "key": _key(inside, taken), "label": scan.labels[i], "bytes": scan.fingerprint[i][1]})
        shards, current, size = [], [], 0
        for item in items:
            full = (samples is not None and len(current) >= samples) or (
                max_bytes is not None and current and size + item["bytes"] > max_bytes)
            if full:
                shards.append(current)
                current, size = [], 0
            current.append(item)
            size += item["bytes"] + 1536  # tar headers of the image, .cls and .json
        if current:
            shards.append(current)
        splits[split] = {"classes": scan.classes, "shards": shards, "skipped": [p for p, _ in scan.bad],
                         "fingerprint": scan.fingerprint}
    return splits


def _encode(path: Path, max_resolution: int | None) -> tuple[bytes, str, dict]:
    """The bytes to store for one image, their extension, and its JSON fields (original size, resized)."""
    from PIL import Image

    from selfsup.data.decode import _errors_name, _strict_truncation

    data = path.read_bytes()
    with _errors_name(str(path)), _strict_truncation(), Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        info = {"width": width, "height": height}
        ext = path.suffix.lower().lstrip(".")
        if max_resolution is None or max(width, height) <= max_resolution:
            image.verify() if image.format != "JPEG" else image.load()  # a bad file fails here, not in training
            return data, ext, info
        is_jpeg = image.format == "JPEG"
        image.draft("RGB", (max_resolution, max_resolution))  # JPEG: decode at a reduced DCT scale first
        image.load()
        rgb = to_rgb(image)
        scale = max_resolution / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = rgb.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        if is_jpeg:
            small.save(out, "JPEG", quality=JPEG_QUALITY)
            ext = "jpg"
        else:
            small.save(out, "PNG")
            ext = "png"
        info["resized_to"] = list(size)
        return out.getvalue(), ext, info


def _encode_task(task: tuple[Path, int | None]) -> tuple[bytes, str, dict] | str:
    """Pool worker: :func:`_encode`, a bad image coming back as its message (never raised across processes)."""
    try:
        return _encode(*task)
    except DataError as err:
        return str(err)


def write_shards(
    root: str | Path,
    out: str | Path,
    max_resolution: int | None = None,
    shard_size: str = DEFAULT_SHARD_SIZE,
    skip_bad: bool = False,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Write WebDataset shards of the ImageNet-layout folder ``root`` into ``out``; returns the metadata.

    Args:
        root: ``root/train/<class>/<image>`` and optionally ``root/val/...`` (or ``root/test/...``).
        out: the shard folder (created; a rerun with the same source and options completes it).
        max_resolution: cap the longer side at this many pixels (re-encoding only larger images).
        shard_size: samples per shard (``"1000"``) or bytes per shard, counted on the source files
            (``"500MB"``, ``"1GB"``).
        skip_bad: leave out (and count) files that are not images or do not decode, instead of stopping.
        seed: seed of the one shuffle of the train samples before they are cut into shards.
        progress: show a bar counting the images written.
        workers: processes that read, check and re-encode images (in order; the main process writes);
            default up to 8 of the cores this process may use for 2,000 images or more, else none.

    Raises:
        DataError: bad layout or image (unless ``skip_bad``); ``out`` holds shards of another source.
        ConfigError: bad ``shard_size`` or ``max_resolution``.
    """
    from webdataset import TarWriter

    from selfsup.progress import make_progress

    root, out = Path(root).expanduser().resolve(), Path(out).expanduser().resolve()
    if max_resolution is not None and max_resolution < 1:
        raise ConfigError(f"--max-resolution must be a positive number of pixels, got {max_resolution!r}")
    if workers is not None and workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {workers!r}")
    samples, max_bytes = parse_shard_size(shard_size)
    if out == root or root in out.parents:
        raise ConfigError(f"{out} is inside the source folder {root}: write the shards elsewhere")
    splits = _plan(root, skip_bad, seed, samples, max_bytes)
    options = {"max_resolution": max_resolution, "shard_size": str(shard_size), "seed": seed, "skip_bad": skip_bad,
               "jpeg_quality": JPEG_QUALITY}
    source = hashlib.sha256(json.dumps([str(root), {s: v["fingerprint"] for s, v in splits.items()}]).encode())
    plan = {"format": 1, "source": str(root), "source_fingerprint": source.hexdigest(), "options": options}
    _claim(out, plan)
    names = {s: [f"{SPLIT_NAMES[s]}-{i:06d}.tar" for i in range(len(v["shards"]))] for s, v in splits.items()}
    total = sum(len(shard) for v in splits.values() for shard in v["shards"])
    bad: list[str] = []
    started = time.time()
    if workers is None:
        workers = min(8, num_cpus()) if total >= _POOL_MIN_IMAGES else 0
    pool = _pool_context().Pool(workers) if workers > 0 else None
    try:
        with make_progress(enabled=progress) as bar_progress:
            bar = bar_progress.add_task(f"writing shards of {root} (images)", total=total)
            for split, v in splits.items():
                for name, shard in zip(names[split], v["shards"], strict=True):
                    if (out / name).is_file():  # renamed into place, so complete
                        bar_progress.advance(bar, len(shard))
                        continue
                    tasks = [(root / item["path"], max_resolution) for item in shard]
                    encoded = pool.imap(_encode_task, tasks, chunksize=8) if pool else map(_encode_task, tasks)
                    with atomic_write(out / name) as f, TarWriter(f, encoder=False, mtime=0.0) as tar:
                        for item, result in zip(shard, encoded, strict=True):
                            bar_progress.advance(bar)
                            if isinstance(result, str):  # a DataError's message
                                if not skip_bad:
                                    raise DataError(result)
                                bad.append(item["path"])
                                continue
                            data, ext, info = result
                            meta = {"path": item["path"], "class": v["classes"][item["label"]], **info}
                            tar.write({"__key__": item["key"], ext: data, "cls": str(item["label"]).encode(),
                                       "json": json.dumps(meta).encode()})
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    counts = {s: sum(len(sh) for sh in v["shards"]) for s, v in splits.items()}
    if skip_bad:  # bad images were left out (in this run or an earlier one): count what the shards hold
        counts = _recount(out, names)
    meta = {
        "format": "selfsup-shards/1",
        "classes": splits["train"]["classes"],
        "splits": {s: {"samples": counts[s], "shards": names[s], "skipped": len(splits[s]["skipped"])}
                   for s in splits},
        "max_resolution": max_resolution,
        "shard_size": str(shard_size),
        "jpeg_quality": JPEG_QUALITY,
        "seed": seed,
        "source": str(root),
        "source_fingerprint": plan["source_fingerprint"],
        "skipped_images": bad,
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "seconds": round(time.time() - started, 1),
    }
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=2) + "\n")
    return meta


def _recount(out: Path, names: dict[str, list[str]]) -> dict[str, int]:
    """Samples per split, counted from the shards' ``.cls`` members (bad images were left out)."""
    import tarfile

    counts = {}
    for split, files in names.items():
        counts[split] = 0
        for name in files:
            with tarfile.open(out / name, "r:") as tf:
                counts[split] += sum(1 for m in tf if m.name.endswith(".cls"))
    return counts


def _claim(out: Path, plan: dict) -> None:
    """Make ``out`` ours for ``plan``: refuse a folder holding other shards; clear our stale temp files."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file: give a folder for the shards")
    plan_path = out / PLAN_NAME
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text())
        except (OSError, ValueError):
            old = None
        if old != plan and not any(out.glob("*.tar")):  # no shard written yet: nothing to keep
            plan_path.unlink()
        elif old != plan:
            why = "another source folder or its files changed" if (old or {}).get("options") == plan["options"] \
                else "other options"
            raise DataError(f"{out} holds shards written from {why} ({(old or {}).get('source')}, "
                            f"{(old or {}).get('options')}): write to an empty folder, or delete {out} first")
    elif out.is_dir() and any(out.glob("*.tar")):
        raise DataError(f"{out} holds .tar files that selfsup shard did not write: choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(out)  # a shard cut short by a crash is written again
    if not plan_path.is_file():
        atomic_write_text(plan_path, json.dumps(plan, indent=2) + "\n")
