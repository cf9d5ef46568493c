"""Data-loading speed at ImageNet scale: images per CPU-second and per wall second, training and evaluation crops.

Generates ImageNet-like JPEGs (500x375, about 100 KB: CIFAR-10 images upscaled with photographic-like
noise so they compress like photographs) in ImageNet layout, then measures, interleaved in one process
(every pipeline once per round, median over rounds):

- ``old``: the loader before issue 22 (a copy of its ``load_image``: PIL decode, ``ImageOps.fit`` to a
  224 centre square; the random crop then happened inside that square on the device);
- ``torchvision``: ``ImageFolder`` + ``RandomResizedCrop(224)`` (training) or ``Resize(256)`` +
  ``CenterCrop(224)`` (evaluation) + ``PILToTensor``;
- ``selfsup``: :class:`~selfsup.data.stream.FolderStream` training views (random-resized crop of the whole
  image, scale (0.08, 1), as torchvision's) and evaluation views (crop_pct 0.875);
- ``selfsup device``: ``--decode device`` with the CPU as the device (workers read bytes; the main process
  decodes, crops and resizes the batch).
- ``selfsup ... (shards)``: the same images written by ``selfsup shard`` (one shard) and read through
  ``--data wds:DIR`` (:class:`~selfsup.data.shards.ShardStream`: one ``pread`` per sample), and written
  with ``--max-resolution 320`` (longer side capped at 320, re-encoded at JPEG quality 90).

CPU-seconds per image come from a pass with no loader workers (``time.process_time`` of the one process,
torch at one thread), so they count all the work; wall time from a DataLoader with the cores this
process may use as workers. The table also gives the cores a node of 8 GPUs needs to feed 2,500
images/s to each (20,000 images/s), and a decoder micro-benchmark (PIL, PIL at 1/2 DCT scale,
``torchvision.io.decode_jpeg``) on the same files.

    python benchmarks/data_speed.py --preset cpu     # 3.3 min on 2 cores at load 11
    python benchmarks/data_speed.py --preset full    # 2,000 images, 5 rounds

Reads ``../shared/data/cifar10-jpeg.tar.gz`` (relative to the repo, or to its parent for a worktree) for the source images; exits 0 with
the reason when it is absent. Writes ``benchmarks/results/data_speed_<preset>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfsup.data.cache import num_cpus  # noqa: E402
from selfsup.data.datamodule import default_workers  # noqa: E402
from selfsup.data.datasets import load_dataset  # noqa: E402
from selfsup.data.device_decode import bytes_collate, decode_batch  # noqa: E402
from selfsup.data.geometry import TrainCrop  # noqa: E402
from selfsup.data.sampler import SampleIndex  # noqa: E402
from selfsup.data.shard_writer import write_shards  # noqa: E402
from selfsup.data.stream import FolderStream  # noqa: E402

TARBALL = next((p / "shared" / "data" / "cifar10-jpeg.tar.gz" for p in (ROOT.parent, ROOT.parent.parent)
                if (p / "shared" / "data" / "cifar10-jpeg.tar.gz").is_file()),
               ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
PRESETS = {"cpu": {"images": 200, "rounds": 3, "batch": 32}, "full": {"images": 2000, "rounds": 5, "batch": 64}}
NODE_RATE = 8 * 2500  # images/s a node of 8 GPUs consumes (ResNet-50, ~2,500 images/s each)


# ---------------------------------------------------------------------------------------------- data


def make_imagenet_like(out: Path, n: int, seed: int = 0) -> Path:
    """``n`` 500x375 JPEGs of ~100 KB in ``out/train/<class>/``, from CIFAR-10 images plus noise."""
    if not TARBALL.is_file():
        raise FileNotFoundError(TARBALL)
    rng = np.random.default_rng(seed)
    written = 0
    with tarfile.open(TARBALL) as tf:
        for member in tf:
            if written >= n:
                break
            if not (member.isfile() and member.name.endswith(".jpg") and "/train/" in member.name):
                continue
            cls = member.name.split("/")[-2]
            small = Image.open(tf.extractfile(member)).convert("RGB")
            big = np.asarray(small.resize((500, 375), Image.Resampling.BICUBIC), dtype=np.float32)
            big = big + rng.normal(0, 16, big.shape)  # film-grain-like texture: compresses like a photo
            path = out / "train" / cls / f"{written:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(big.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            written += 1
    return out


# ---------------------------------------------------------------------------------------------- pipelines


def old_load_image(path: str, size: int = 224) -> np.ndarray:
    """The loader before issue 22 (selfsup/data/datasets.py at 2da50b1): decode whole, centre square, PIL resize."""
    with Image.open(path) as image:
        image.load()
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BILINEAR)
        return np.array(rgb, dtype=np.uint8)


class OldStream(torch.utils.data.Dataset):
    def __init__(self, files: list[str], labels: np.ndarray) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return torch.from_numpy(old_load_image(self.files[int(i)])).permute(2, 0, 1), int(self.labels[int(i)])


def shard_streams(root: Path, work: Path) -> dict[str, object]:
    """The folder written as shards by ``selfsup shard``, as is and with ``--max-resolution 320``."""
    out = {}
    for label, cap in (("shards", None), ("shards, max-resolution 320", 320)):
        dest = work / f"wds-{cap or 'full'}"
        write_shards(root, dest, max_resolution=cap, progress=False)
        out[label] = load_dataset(f"wds:{dest}", "train", image_size=224, cache_dir=work / "cache")
    return out


def pipelines(root: Path, files: list[str], labels: np.ndarray, shards: dict[str, object]) -> dict[str, tuple]:
    """name -> (dataset, collate, post) where post turns a loader batch into images (device decode)."""
    from torchvision import datasets as tvd
    from torchvision.transforms import v2

    stream = FolderStream(files, labels, [str(c) for c in range(10)], 224, "bench")
    train = stream.training_views(TrainCrop(224, (0.08, 1.0)), seed=0)
    tv_train = tvd.ImageFolder(str(root / "train"), transform=v2.Compose(
        [v2.RandomResizedCrop(224, antialias=True), v2.PILToTensor()]))  # the usual recipe: crop on PIL
    tv_eval = tvd.ImageFolder(str(root / "train"), transform=v2.Compose(
        [v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.PILToTensor()]))
    def device(b):
        return decode_batch(*b, device="cpu")
    return {
        "old (decode whole, 224 centre square)": (OldStream(files, labels), None, None),
        "torchvision ImageFolder + RandomResizedCrop": (tv_train, None, None),
        "selfsup train crops (folder)": (train, None, None),
        "selfsup train crops, device decode (CPU)": (train.encoded(), bytes_collate, device),
        **{f"selfsup train crops ({k})": (v.training_views(TrainCrop(224, (0.08, 1.0)), seed=0), None, None)
           for k, v in shards.items()},
        "torchvision Resize(256) + CenterCrop(224)": (tv_eval, None, None),
        "selfsup eval crops (folder)": (stream, None, None),
        **{f"selfsup eval crops ({k})": (v, None, None) for k, v in shards.items()},
    }


def run_once(dataset, collate, post, batch: int, workers: int) -> tuple[float, float, int]:
    """(wall s, CPU s of this process, images) for one pass over ``dataset``."""
    sampler = [SampleIndex(i, 0) for i in range(len(dataset))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=collate)
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for b in loader:
        images = post(b)[0] if post is not None else b[0]
        n += len(images)
    return time.perf_counter() - wall, time.process_time() - cpu, n


def decoders(files: list[str], reps: int) -> dict[str, float]:
    """ms of CPU per image for the JPEG decoders alone."""
    from torchvision.io import decode_jpeg

    blobs = [Path(f).read_bytes() for f in files[:50]]

    def pil(b):
        with Image.open(io.BytesIO(b)) as im:
            im.load()

    def pil_half(b):
        with Image.open(io.BytesIO(b)) as im:
            im.draft(None, (im.size[0] // 2, im.size[1] // 2))
            im.load()

    def tv(b):
        decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))

    out: dict[str, list[float]] = {"PIL": [], "PIL draft 1/2": [], "torchvision decode_jpeg": []}
    for _ in range(reps):
        for name, f in zip(out, (pil, pil_half, tv), strict=True):
            t = time.process_time()
            for b in blobs:
                f(b)
            out[name].append((time.process_time() - t) / len(blobs) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--workers", type=int, default=None, help="loader workers for the wall-time pass "
                        "(default: the cores this process may use)")
    args = parser.parse_args()
    cfg = PRESETS[args.preset]
    if not TARBALL.is_file():
        print(f"data_speed: skipped: {TARBALL} not found (the CIFAR-10 JPEG tarball the images are made from)")
        return 0
    torch.set_num_threads(1)
    workers = args.workers if args.workers is not None else num_cpus()
    load_start = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        root = make_imagenet_like(Path(tmp) / "imagenet-like", cfg["images"])
        files = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
        classes = sorted({Path(f).parent.name for f in files})
        labels = np.array([classes.index(Path(f).parent.name) for f in files], dtype=np.int64)
        kb = statistics.mean(os.path.getsize(f) for f in files) / 1e3
        pipes = pipelines(root, files, labels, shard_streams(root, Path(tmp)))
        cpu: dict[str, list[float]] = {k: [] for k in pipes}
        wall: dict[str, list[float]] = {k: [] for k in pipes}
        for r in range(cfg["rounds"]):
            for name, (ds, collate, post) in pipes.items():
                _, c, n = run_once(ds, collate, post, cfg["batch"], 0)
                cpu[name].append(n / c)
                w, _, n = run_once(ds, collate, post, cfg["batch"], workers)
                wall[name].append(n / w)
            print(f"round {r + 1}/{cfg['rounds']} done", file=sys.stderr)
        dec = decoders(files, cfg["rounds"])
    rows = []
    old = statistics.median(cpu[next(iter(pipes))])
    for name in pipes:
        per_cpu, per_wall = statistics.median(cpu[name]), statistics.median(wall[name])
        rows.append({"pipeline": name, "images_per_cpu_s": round(per_cpu, 1), "images_per_wall_s": round(per_wall, 1),
                     "vs_old_per_cpu_s": round(per_cpu / old, 2), "cores_for_8_gpus": round(NODE_RATE / per_cpu)})
    result = {
        "benchmark": "data_speed", "preset": args.preset, "images": len(files), "mean_kb": round(kb, 1),
        "size": "500x375 -> 224", "workers_wall": workers, "default_workers": default_workers(1),
        "rows": rows, "decoder_ms_per_image": dec,
        "machine": {"platform": platform.platform(), "cpus_affinity": num_cpus(), "torch": torch.__version__},
        "loadavg_start": load_start, "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": f"python benchmarks/data_speed.py --preset {args.preset}",
    }
    out = ROOT / "benchmarks" / "results" / f"data_speed_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(r["pipeline"]) for r in rows)
    print(f"{len(files)} ImageNet-like JPEGs ({kb:.0f} KB mean, 500x375) -> 224; wall with {workers} workers; "
          f"load avg {load_start} -> {result['loadavg_end']}")
    print(f"{'pipeline':<{width}}  img/CPU-s  img/wall-s  vs old  cores for 8x2500 img/s")
    for r in rows:
        print(f"{r['pipeline']:<{width}}  {r['images_per_cpu_s']:9.1f}  {r['images_per_wall_s']:10.1f}  "
              f"{r['vs_old_per_cpu_s']:5.2f}x  {r['cores_for_8_gpus']:6d}")
    print("JPEG decode alone, ms of CPU per image: " + ", ".join(f"{k} {v}" for k, v in dec.items()))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
