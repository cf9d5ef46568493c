"""Training speed of every method against its physical floor, and whether the data pipeline keeps up.

For each registered method (or ``--methods``) on one backbone, image size and batch:

- **step**: seconds per full training step, run by a real Lightning ``Trainer`` (so manual-optimisation
  methods such as the GANs are timed as they train), median over the timed steps;
- **floor**: the same backbone's own forward + backward (+ optimiser step) on the same images, a linear
  head and cross-entropy on its pooled features: what any method must pay at least once;
- **overhead** = step / floor, measured interleaved (floor, method, floor, method, ...) in one process,
  so machine load moves both alike; the median of the per-round ratios is reported. Rotation's ~4x is
  by design (four rotated copies of every image); patch methods pay per patch.

Then the data pipeline's images/s on real CIFAR-10 (when the archive is there): the decoded uint8
cache behind ``SelfSupDataModule`` against a JPEG decode per item (torchvision ``ImageFolder``), with the
same batch size and workers, beside the fastest method's consumption, so the table says whether data
is the bottleneck. Evaluation costs are in ``eval_speed.py``.

    python benchmarks/speed.py --preset cpu --threads 2
    python benchmarks/speed.py --preset gpu            # cifar_resnet18, batch 256, bf16, channels-last

Prints a table and writes ``benchmarks/results/speed_<preset>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PRESETS = {
    "ci": {"backbone": "convnet_small", "image_size": 16, "batch": 8, "rounds": 1, "steps": 3, "warmup": 1,
           "device": "cpu", "precision": "32-true", "channels_last": False, "data_batches": 3},
    "cpu": {"backbone": "convnet_small", "image_size": 32, "batch": 64, "rounds": 3, "steps": 6, "warmup": 2,
            "device": "cpu", "precision": "32-true", "channels_last": False, "data_batches": 40},
    "gpu": {"backbone": "cifar_resnet18", "image_size": 32, "batch": 256, "rounds": 3, "steps": 20, "warmup": 5,
            "device": "gpu", "precision": "bf16-mixed", "channels_last": True, "data_batches": 100},
}


class _Repeat(Dataset):
    """One fixed batch of uint8 images and labels, ``n`` times (the loader's cost is ~0)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, n: int) -> None:
        self.images, self.labels, self.n = images, labels, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.images, self.labels


class _StepTimer(pl.Callback):
    """Seconds of every training batch, device-synchronised."""

    def __init__(self) -> None:
        self.times: list[float] = []

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)


class BackboneFloor(pl.LightningModule):
    """The physical floor of a method: the backbone's forward + backward (and the step) on the batch."""

    def __init__(self, backbone: str, in_chans: int, num_classes: int = 10, channels_last: bool = False) -> None:
        super().__init__()
        from selfsup.ssl.backbone import Backbone

        self.backbone = Backbone(backbone, in_chans=in_chans)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.channels_last = channels_last

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def training_step(self, batch, batch_idx):
        x = batch[0].float().div(255)[:, : self.backbone.in_chans]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(self.head(self.backbone(x)), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _time_steps(model: pl.LightningModule, images, labels, preset: dict) -> float:
    """Median seconds per training step after ``warmup`` steps, under a real Trainer."""
    timer = _StepTimer()
    n = preset["warmup"] + preset["steps"]
    loader = DataLoader(_Repeat(images, labels, n), batch_size=None, num_workers=0)
    trainer = pl.Trainer(
        default_root_dir=tempfile.mkdtemp(prefix="selfsup-speed-"),  # a method's sample grids land there, not here
        accelerator=preset["device"], devices=1, precision=preset["precision"], max_steps=n, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=loader)
    return statistics.median(timer.times[preset["warmup"] :])


def method_speed(method: str, preset: dict) -> dict:
    """Interleaved rounds of the floor and the method; median step times and the median ratio."""
    from selfsup.ssl.module import METHODS, method_arguments

    cls = METHODS[method]
    kw = {"channels_last": preset["channels_last"]}
    if cls.uses_backbone:
        kw["backbone"] = preset["backbone"]
    if "image_size" in method_arguments(cls):
        kw["image_size"] = preset["image_size"]
    torch.manual_seed(0)
    model = cls(**kw)
    b, s = preset["batch"], preset["image_size"]
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8)
    labels = torch.randint(0, 10, (b,))
    # A flow has no trunk: its floor is the preset backbone's, for scale.
    in_chans = model.backbone.in_chans if model.backbone is not None else 3
    floor = BackboneFloor(preset["backbone"], in_chans, channels_last=preset["channels_last"])
    steps, floors = [], []
    for _ in range(preset["rounds"]):
        floors.append(_time_steps(floor, images, labels, preset))
        steps.append(_time_steps(model, images, labels, preset))
    ratios = [a / f for a, f in zip(steps, floors, strict=True)]
    step, fl = statistics.median(steps), statistics.median(floors)
    return {
        "method": method, "batch": b, "image_size": s, "step_s": step, "floor_s": fl,
        "overhead": statistics.median(ratios), "overhead_per_round": ratios, "images_per_s": b / step,
    }


def data_speed(data: Path, preset: dict, workers: int) -> list[dict]:
    """images/s of the decoded uint8 cache loader and of a JPEG-decoding ImageFolder loader."""
    import torchvision
    from torchvision.transforms import v2

    from selfsup.data.datamodule import SelfSupDataModule

    out = []
    dm = SelfSupDataModule(data=str(data / "train") if (data / "train" / "train").is_dir() else str(data),
                           batch_size=preset["batch"], num_workers=workers)
    dm.setup("fit")
    jpeg = torchvision.datasets.ImageFolder(
        str(data / "train"), transform=v2.Compose([v2.PILToTensor(), v2.Resize((preset["image_size"],) * 2)])
    )
    loaders = {
        "decoded uint8 cache (SelfSupDataModule)": dm.train_dataloader(),
        "JPEG decode per item (ImageFolder)": DataLoader(jpeg, batch_size=preset["batch"], shuffle=True,
                                                         num_workers=workers, drop_last=True),
    }
    for name, loader in loaders.items():
        it = iter(loader)
        next(it)  # worker start-up and the first batch stay out of the rate
        start, n = time.perf_counter(), 0
        for _ in range(preset["data_batches"]):
            n += next(it)[0].shape[0]
        out.append({"pipeline": name, "workers": workers, "images_per_s": n / (time.perf_counter() - start)})
    return out


def main(argv: list[str] | None = None) -> int:
    from quality import find_data  # the shared CIFAR-10 archive, extracted once

    import selfsup  # noqa: F401  (registers every method)
    from selfsup.quiet import quiet_lightning
    from selfsup.ssl.module import METHODS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--methods", help=f"comma-separated methods (default: all registered: {','.join(sorted(METHODS))})")
    ap.add_argument("--data", help="CIFAR-10 ImageNet-layout root for the data-pipeline rows (default: the shared archive)")
    ap.add_argument("--no-data", action="store_true", help="skip the data-pipeline rows")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader workers")
    ap.add_argument("--threads", type=int, help="torch CPU threads (state it with the numbers)")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/speed_<preset>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if preset["device"] == "gpu" and not torch.cuda.is_available():
        print("skipped: --preset gpu needs a CUDA device")
        return 0
    methods = args.methods.split(",") if args.methods else sorted(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"speed.py: error: unknown methods {unknown}; known: {', '.join(sorted(METHODS))}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    console = Console(width=100)
    rows = []
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        for m in methods:
            rows.append(method_speed(m, preset))
            console.log(f"{m}: {rows[-1]['step_s'] * 1e3:.1f} ms/step, {rows[-1]['overhead']:.2f}x its floor")
    data_rows = []
    data = None if args.no_data else find_data(args.data)
    if data is not None:
        data_rows = data_speed(data, preset, args.workers)

    table = Table(title=f"training step, {preset['backbone']}, batch {preset['batch']}, "
                        f"{preset['image_size']} px, {preset['precision']}, {preset['device']}")
    for col in ("method", "step ms", "floor ms", "overhead", "images/s"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for r in rows:
        table.add_row(r["method"], f"{r['step_s'] * 1e3:.1f}", f"{r['floor_s'] * 1e3:.1f}", f"{r['overhead']:.2f}x",
                      f"{r['images_per_s']:.0f}")
    console.print(table)
    if data_rows:
        need = max(r["images_per_s"] for r in rows)
        dt = Table(title=f"data pipeline, CIFAR-10 train, batch {preset['batch']} (fastest method eats {need:.0f} images/s)")
        for col in ("pipeline", "workers", "images/s", "keeps up?"):
            dt.add_column(col)
        for r in data_rows:
            dt.add_row(r["pipeline"], str(r["workers"]), f"{r['images_per_s']:.0f}",
                       "yes" if r["images_per_s"] >= need else f"no ({r['images_per_s'] / need:.2f}x)")
        console.print(dt)
    result = {
        "benchmark": "speed", "preset": args.preset, "config": preset,
        "command": " ".join(["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "loadavg": os.getloadavg()},
        "methods": rows, "data": data_rows,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"speed_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
