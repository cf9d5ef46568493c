"""Quality of each method within a fixed pretraining budget on CIFAR-10, against the random-init floor.

Pretrains a method on the real CIFAR-10 train split (ImageNet-layout JPEGs) for a fixed wall-clock
budget, then extracts features of the pretrained encoder and of a randomly initialised encoder of the
same architecture once, and scores both with the linear probe and kNN on the 10,000 test images.
Prints a table and writes ``benchmarks/results/pretrain_quality.json``.

    python benchmarks/pretrain_quality.py --preset cpu --methods cpc,rotation
    python benchmarks/pretrain_quality.py --preset gpu --methods cpc --data /data/cifar10

Skips (exit 0, with the reason) when the CIFAR-10 archive is not there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

PRESETS = {
    # 2 CPU cores: a small backbone, minutes of pretraining.
    # CPC's context network (2.0M parameters at width 256) would cost 8x the 241K-parameter backbone here.
    "cpu": {"backbone": "convnet_small", "budget": "00:00:08:00", "epochs": 2, "batch_size": {"cpc": 32, "rotation": 128, "vae": 64},
            # vae: ~100 steps fit the budget on a loaded machine; 0.1 epochs of warm-up (78 steps) would fill it.
            "model": {"cpc": {"context_hidden": 64, "context_blocks": 2}, "vae": {"warmup_epochs": 0.01}}},
    # one GPU: the CIFAR ResNet-18, an hour per method.
    "gpu": {"backbone": "cifar_resnet18", "budget": "00:01:00:00", "epochs": 100,
            "batch_size": {"cpc": 256, "rotation": 512}, "model": {}},
}
LR = {"cpc": 1e-3, "rotation": 0.1, "vae": 1e-3}


def find_data(path: str | None) -> Path | None:
    """The CIFAR-10 ImageNet-layout root: given, or extracted once from the shared archive."""
    if path:
        return Path(path)
    if not ARCHIVE.is_file():
        return None
    dest = Path(os.environ.get("SELFSUP_CACHE", Path.home() / ".cache" / "selfsup")) / "cifar10-jpeg"
    if not (dest / "cifar10" / "test").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(dest, filter="data")
    return dest / "cifar10"


def held_out_bits_per_dim(run, out: Path) -> float | None:
    """``val/bits_per_dim`` of the final weights on the test split; its sample grid is copied beside ``out``."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, devices=1,
                         default_root_dir=str(run.run_dir))
    metrics = trainer.validate(run.model, datamodule=run.datamodule, verbose=False)[0]
    grids = sorted((run.run_dir / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime)
    if grids:
        dest = out.with_name(f"{out.stem}_{run.model.method_name}_samples.png")
        shutil.copyfile(grids[-1], dest)
        print(f"{run.model.method_name}: samples and reconstructions in {dest}")
    return metrics.get("val/bits_per_dim")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--methods", default="cpc,rotation", help="comma-separated registered methods")
    ap.add_argument("--data", help="CIFAR-10 ImageNet-layout root (default: extract ../shared/data's archive)")
    ap.add_argument("--budget", help="pretraining wall time per method, DD:HH:MM:SS (default: the preset's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pretrain_quality.json"))
    args = ap.parse_args()

    data = find_data(args.data)
    if data is None:
        print(f"skipped: CIFAR-10 not found ({ARCHIVE} is absent and no --data was given)")
        return 0
    from selfsup.eval import harness
    from selfsup.train import pretrain

    preset = PRESETS[args.preset]
    budget = args.budget or preset["budget"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            cfg = {
                "method": method,
                "model": {"backbone": preset["backbone"], "lr": LR.get(method, 0.1), "warmup_epochs": 0.1,
                          **preset["model"].get(method, {})},
                "data": {"data": str(data), "batch_size": preset["batch_size"].get(method, 128)},
                "trainer": {"max_epochs": preset["epochs"], "max_time": budget, "check_val_every_n_epoch": 1000},
                "output": tmp,
                "name": method,
                "online_probe": False,
            }
            start = time.perf_counter()
            run = pretrain(cfg)
            train_s = time.perf_counter() - start
            steps = int(run.model.trainer.global_step)
            bpd = held_out_bits_per_dim(run, Path(args.out)) if run.model.validates else None
            src = harness.resolve_source(str(run.run_dir))
            start = time.perf_counter()
            ev = harness.prepare(src, progress=False)
            extract_s = time.perf_counter() - start
            probe, knn = harness.evaluate(ev, "probe"), harness.evaluate(ev, "knn")
            for name in ev.features:
                rows.append({
                    "method": method, "encoder": name, "pretrain_steps": steps, "pretrain_seconds": round(train_s, 1),
                    "extract_seconds": round(extract_s, 1), "linear_top1": probe[name]["top1"],
                    "knn_top1": knn[name]["top1"],
                    **({"val_bits_per_dim": bpd} if bpd is not None and name == src.name else {}),
                })

    table = Table(title=f"CIFAR-10, {args.preset} preset, pretraining budget {budget} per method")
    for col in ("method", "encoder", "steps", "pretrain s", "linear top-1", "kNN top-1", "bits/dim"):
        table.add_column(col)
    for r in rows:
        bpd = f"{r['val_bits_per_dim']:.3f}" if "val_bits_per_dim" in r else ""
        table.add_row(r["method"], r["encoder"], str(r["pretrain_steps"]), str(r["pretrain_seconds"]),
                      f"{r['linear_top1']:.1f}", f"{r['knn_top1']:.1f}", bpd)
    Console().print(table)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "loadavg": os.getloadavg()},
        "preset": args.preset, "backbone": preset["backbone"], "budget": budget, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
