"""CPC v2 speed and memory: training-step overhead over the bare backbone, throughput, loss memory.

(a) overhead = one full CPC training step (augment, patchify, patch augmentation, backbone forward and
    backward, context network, InfoNCE, optimiser step) / the backbone's own forward + backward over
    the same ``B * P`` patches (target <= 1.3x);
(b) patches/s and images/s of the full step per batch size;
(c) peak memory of the loss alone (GridInfoNCE forward + backward) at batch 256 on a 7x7 grid, with
    and without chunking: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the rise of the peak
    resident set size of a fresh subprocess (target < 1 GB), next to the analytic size of the logits.

    python benchmarks/cpc_speed.py --preset cpu   # a few minutes on 2 cores, convnet_small
    python benchmarks/cpc_speed.py --preset gpu   # cifar_resnet18, batches 32 / 128 / 256

Writes ``benchmarks/results/cpc_speed.json`` and prints a rich table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfsup.ssl.cpc import CPC  # noqa: E402
from selfsup.ssl.losses import GridInfoNCE  # noqa: E402

PRESETS = {
    # (backbone, batch sizes): the default backbone for the overhead figure, convnet_small for large batches
    "cpu": {
        "runs": (("cifar_resnet18", (8, 32)), ("convnet_small", (32, 128, 256))),
        "warmup": 1,
        "reps": 3,
        "device": "cpu",
    },
    "gpu": {
        "runs": (("cifar_resnet18", (32, 128, 256)), ("convnet_small", (32, 128, 256))),
        "warmup": 3,
        "reps": 10,
        "device": "cuda",
    },
}
MEMORY_BATCH, MEMORY_GRID = 256, 7


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, warmup: int, reps: int) -> float:
    """Best-of-``reps`` seconds per call: the minimum is the least disturbed by other jobs on the machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def speed(preset: dict, backbone: str, batch: int) -> dict:
    device = preset["device"]
    torch.manual_seed(0)
    model = CPC(backbone=backbone).to(device).train()
    opt = model.build_optimizer(model.parameters())
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    n_patches = batch * model.geometry.grid**2

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.loss((images, labels))["loss"].backward()
        opt.step()

    patches = torch.randn(n_patches, 3, model.geometry.patch, model.geometry.patch, device=device)

    def backbone_only() -> None:
        model.zero_grad(set_to_none=True)
        model.backbone(patches).sum().backward()

    t_step = _timed(step, device, preset["warmup"], preset["reps"])
    t_backbone = _timed(backbone_only, device, preset["warmup"], preset["reps"])
    return {
        "backbone": backbone,
        "batch": batch,
        "patches": n_patches,
        "step_s": t_step,
        "backbone_fwd_bwd_s": t_backbone,
        "overhead": t_step / t_backbone,
        "patches_per_s": n_patches / t_step,
        "images_per_s": batch / t_step,
    }


def _peak_rss() -> int:
    """Peak resident bytes of this process image (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def loss_memory(device: str, chunk_size: int | None, target_dim: int = 64) -> dict:
    """Peak extra memory of GridInfoNCE forward + backward at batch 256 on a 7x7 grid, CPC defaults."""
    torch.manual_seed(0)
    b, g = MEMORY_BATCH, MEMORY_GRID
    offsets = (2, 3, 4, 5)  # defaults for a 7x7 grid of half-overlapping patches
    crit = GridInfoNCE(offsets, chunk_size=chunk_size)
    preds = torch.randn(1, len(offsets), b, g, g, target_dim, device=device, requires_grad=True)
    targets = torch.randn(b, g, g, target_dim, device=device, requires_grad=True)
    rows = b * g * sum(g - k for k in offsets)
    candidates = b * g * g
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # resident now (not the import-time peak); large tensors are mmap'd, so RSS follows them
        base = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    start = time.perf_counter()
    loss, _ = crit(preds, targets)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss() - base
    chunk_rows = rows if chunk_size is None else min(chunk_size, rows)
    return {
        "chunk_size": chunk_size,
        "prediction_rows": rows,
        "candidates": candidates,
        "logits_chunk_mb": chunk_rows * candidates * 4 / 2**20,
        "all_logits_mb": rows * candidates * 4 / 2**20,
        "peak_extra_mb": peak / 2**20,
        "method": "torch.cuda.max_memory_allocated"
        if device == "cuda"
        else "peak RSS (VmHWM) rise of a fresh process",
        "fwd_bwd_s": time.perf_counter() - start,
    }


def loss_memory_subprocess(device: str, chunk_size: int | None) -> dict:
    """On CPU the peak RSS is per process, so each measurement gets a fresh one."""
    if device == "cuda":
        return loss_memory(device, chunk_size)
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-only",
            "--chunk-size",
            str(chunk_size),
            "--threads",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpc_speed.json")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); use fewer than the cores other jobs leave idle",
    )
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", default="4096", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(loss_memory("cpu", None if args.chunk_size == "None" else int(args.chunk_size))))
        return

    from rich.console import Console
    from rich.table import Table

    preset = dict(PRESETS[args.preset])
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA device")
    console = Console(width=120)
    rows = []
    for backbone, batches in preset["runs"]:
        for batch in batches:
            rows.append(speed(preset, backbone, batch))
            console.log(
                f"{backbone} batch {batch}: {rows[-1]['overhead']:.2f}x, "
                f"{rows[-1]['images_per_s']:.1f} images/s"
            )
    memory = [loss_memory_subprocess(preset["device"], c) for c in (4096, None)]

    table = Table(
        title=f"CPC v2 training step, 32 px images, 8 px patches / stride 4 (7x7 grid), {preset['device']}"
    )
    for col in (
        "backbone",
        "batch",
        "patches",
        "step (s)",
        "backbone f+b (s)",
        "overhead",
        "patches/s",
        "images/s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["backbone"],
            str(r["batch"]),
            str(r["patches"]),
            f"{r['step_s']:.3f}",
            f"{r['backbone_fwd_bwd_s']:.3f}",
            f"{r['overhead']:.2f}x",
            f"{r['patches_per_s']:.0f}",
            f"{r['images_per_s']:.1f}",
        )
    console.print(table)
    mem = Table(title=f"InfoNCE loss alone, batch {MEMORY_BATCH}, 7x7 grid, offsets 2..5, 64-d targets")
    for col in (
        "chunk_size",
        "rows x candidates",
        "logits chunk (MB)",
        "all logits (MB)",
        "peak extra (MB)",
        "f+b (s)",
    ):
        mem.add_column(col, justify="right")
    for m in memory:
        mem.add_row(
            str(m["chunk_size"]),
            f"{m['prediction_rows']} x {m['candidates']}",
            f"{m['logits_chunk_mb']:.0f}",
            f"{m['all_logits_mb']:.0f}",
            f"{m['peak_extra_mb']:.0f}",
            f"{m['fwd_bwd_s']:.2f}",
        )
    console.print(mem)

    result = {
        "benchmark": "cpc_speed",
        "preset": args.preset,
        "machine": machine(),
        "config": {
            "image_size": 32,
            "patch": 8,
            "stride": 4,
            "grid": 7,
            "offsets": [2, 3, 4, 5],
            "target_dim": 64,
            "context_blocks": 5,
            "context_hidden": 256,
            "optimizer": "adamw",
            "precision": "fp32",
            "warmup_steps": preset["warmup"],
            "timing": "best of reps",
            "reps": preset["reps"],
        },
        "speed": rows,
        "loss_memory": memory,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
