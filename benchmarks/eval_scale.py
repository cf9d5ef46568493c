"""The evaluation harness at ImageNet scale: time and peak memory of probe, kNN and sweep on synthetic features.

Synthetic features (Gaussian classes, ``C`` classes in ``D`` dimensions) are written chunk by chunk to a
memory-mapped ``.npy`` file of N rows, as the feature cache stores them; a test set of M rows likewise.
Each measurement runs in a fresh subprocess that memory-maps the files, runs one task, and reports its
wall time and its peak resident memory (``VmHWM``, which counts the file's mapped pages the process
touched), so one task's memory never hides another's:

- ``probe``: :func:`selfsup.eval.linear_probe` on all N rows (its L2 search on a 20% hold-out + refit).
- ``knn``: :func:`selfsup.eval.knn_classify`, k=20 majority vote (faiss on the CPU when installed, else
  the torch search; torch on a GPU).
- ``sweep``: :func:`selfsup.eval.label_efficiency.label_efficiency_sweep` at 1%, 10% and 100% of the
  labels, 1 seed, linear + kNN.
- ``evals`` (not in the presets' task lists): one probe loss + gradient evaluation over all N rows,
  streamed from the memory map vs held resident, interleaved 3 times: what the resident budget buys.

Presets::

    python benchmarks/eval_scale.py --preset ci              # seconds: N=2k, D=64, C=10 (run by the tests)
    python benchmarks/eval_scale.py --preset cpu             # this 2-core / 24 GB machine: see README
    python benchmarks/eval_scale.py --preset gpu             # N = 50k, 200k, 500k, 1.28M; D=2048; C=1000; cuda

``--sizes``, ``--dim``, ``--classes``, ``--test``, ``--device``, ``--dtype``, ``--max-iter``, ``--grid``,
``--resident-mib`` and ``--tasks`` override a preset. The probe holds a training set resident when twice
its float32 size fits its budget (256 MiB on the CPU, 60% of free memory on a GPU) and streams it from
the memory map otherwise; each result records that budget (``resident_budget_mib``). The ``cpu`` preset
caps L-BFGS at a few iterations on one L2 strength
(a memory run: memory does not depend on the iteration count; its accuracy is not a converged probe's).
Writes ``benchmarks/results/eval_scale_<preset>.json`` and prints a table. Unattended-safe: a task that
fails is recorded with its error and the next one runs; faiss missing means the torch kNN path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "ci": {"sizes": [2000], "dim": 64, "classes": 10, "sep": 0.4, "test": 500, "device": "cpu", "max_iter": 500,
           "grid": None, "tasks": ["probe", "knn", "sweep"], "dtype": "float32"},
    "cpu": {"sizes": [50_000, 200_000], "dim": 2048, "classes": 1000, "sep": 0.3, "test": 1000, "device": "cpu",
            "max_iter": 3, "grid": [1e-4], "tasks": ["probe", "knn", "sweep"], "dtype": "float32"},
    "gpu": {"sizes": [50_000, 200_000, 500_000, 1_281_167], "dim": 2048, "classes": 1000, "sep": 0.3, "test": 50_000,
            "device": "cuda", "max_iter": 500, "grid": None, "tasks": ["probe", "knn", "sweep"],
            "dtype": "float32"},
}


def write_features(path: Path, n: int, d: int, c: int, dtype: str, seed: int, sep: float = 0.3) -> None:
    """Write n rows of Gaussian-class features to a memory-mapped .npy file, 16k rows at a time, and labels.

    Class means are N(0, sep^2) per dimension, noise N(0, 1): ``sep`` sets how hard the task is.
    """
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(12345).normal(size=(c, d)).astype(np.float32) * sep
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(n, d))
    y = np.arange(n, dtype=np.int64) % c
    rng.shuffle(y)
    for s in range(0, n, 16384):
        yy = y[s : s + 16384]
        x[s : s + 16384] = means[yy] + rng.standard_normal((len(yy), d), dtype=np.float32)
    x.flush()
    del x
    np.save(path.with_suffix(".labels.npy"), y)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss where /proc is missing), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    """One task in this process: print one JSON line with its timing, memory and result."""
    import torch

    torch.set_num_threads(args.threads)
    from selfsup.eval import knn_classify, linear_probe
    from selfsup.eval.knn import has_faiss
    from selfsup.eval.label_efficiency import label_efficiency_sweep

    base_rss = peak_rss_mib()
    tx = np.load(args.train, mmap_mode="r")
    ty = np.load(Path(args.train).with_suffix(".labels.npy"))
    vx = np.load(args.test_file, mmap_mode="r")
    vy = np.load(Path(args.test_file).with_suffix(".labels.npy"))
    device = args.device
    lin = {"max_iter": args.max_iter, "weight_decays": args.grid, "device": device}
    if args.resident_mib is not None:
        lin["resident_bytes"] = int(args.resident_mib * 2**20)
    if args.max_iter < 5:
        lin["min_iter"] = args.max_iter
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.task == "probe":
        res = linear_probe(tx, ty, vx, vy, **lin)
        out = {"top1": res["top1"], "weight_decay": res["weight_decay"], "fit": res["fit"],
               "val_curve": [(p["weight_decay"], round(p["val_top1"], 2), p["iterations"]) for p in res["val_curve"]]}
    elif args.task == "evals":
        out = resident_vs_streamed(tx, ty, device, int(ty.max()) + 1)
    elif args.task == "knn":
        res = knn_classify(tx, ty, vx, vy, k=20, device=device)
        out = {"top1": res["top1"], "backend": res["backend"]}
    else:
        res = label_efficiency_sweep({"synthetic": (tx, ty, vx, vy)}, ks=(), percents=(1, 10, 100), seeds=(0,),
                                     progress=False, linear_kwargs=lin, device=device)
        out = {"budgets": {b["budget"]: {m: round(res["results"]["synthetic"][m][i]["top1_mean"], 2)
                                          for m in ("linear", "knn")}
                           for i, b in enumerate(res["results"]["synthetic"]["linear"])}}
    seconds = time.perf_counter() - start
    from selfsup.eval.linear import _resident_budget

    budget = _resident_budget(torch.device(device), lin.get("resident_bytes"))
    out.update({"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": base_rss,
                "faiss": has_faiss(), "resident_budget_mib": round(budget / 2**20)})
    if device.startswith("cuda"):
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(out))


def resident_vs_streamed(tx, ty, device: str, num_classes: int, rounds: int = 3) -> dict:
    """Seconds of one probe loss + gradient evaluation over all rows, streamed from the memory map vs held
    resident (standardised float32), interleaved ``rounds`` times in this process so the ratio holds on a
    shared machine."""
    import torch

    from selfsup.eval import linear as lin

    dev = torch.device(device)
    x, y = torch.from_numpy(np.asarray(tx)), torch.from_numpy(np.asarray(ty)).long()
    stats = lin._mean_std(x, dev)
    w = torch.randn(x.shape[1], num_classes, generator=torch.Generator().manual_seed(0)).mul_(0.01).to(dev)
    b = torch.zeros(num_classes, device=dev)
    t = time.perf_counter()
    resident = lin._prepare_rows(x, y, None, stats, dev, num_classes, resident_bytes=2**62)
    copy_s = time.perf_counter() - t
    streamed = lin._prepare_rows(x, y, None, stats, dev, num_classes, resident_bytes=0)
    times: dict[str, list[float]] = {"streamed": [], "resident": []}
    for _ in range(rounds):
        for name, data in (("streamed", streamed), ("resident", resident)):
            t = time.perf_counter()
            lin._loss_and_grad(data, w, b, 1e-3)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    return {"streamed_s": times["streamed"], "resident_s": times["resident"], "resident_copy_s": copy_s,
            "streamed_over_resident": best["streamed"] / best["resident"]}


def run_task(task: str, train: Path, test: Path, cfg: dict, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--train", str(train), "--test-file",
           str(test), "--device", cfg["device"], "--max-iter", str(cfg["max_iter"]), "--threads", str(threads)]
    if cfg["grid"]:
        cmd += ["--grid", ",".join(f"{g:g}" for g in cfg["grid"])]
    if cfg.get("resident_mib") is not None:
        cmd += ["--resident-mib", str(cfg["resident_mib"])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:500]}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    p.add_argument("--sizes", help="comma-separated N values (training rows)")
    p.add_argument("--dim", type=int)
    p.add_argument("--classes", type=int)
    p.add_argument("--test", type=int, help="test rows")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    p.add_argument("--dtype", choices=["float32", "float16"])
    p.add_argument("--sep", type=float, help="class-mean scale (noise has unit variance)")
    p.add_argument("--max-iter", type=int)
    p.add_argument("--grid", help="comma-separated L2 strengths (default: the probe's)")
    p.add_argument("--resident-mib", type=float,
                   help="the probe's resident budget in MiB (default: the library's, 256 on the CPU)")
    p.add_argument("--tasks", help="comma-separated: probe,knn,sweep,evals")
    p.add_argument("--threads", type=int, default=max(1, min(16, os.cpu_count() or 1)))
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per task before it is recorded as timed out")
    p.add_argument("--workdir", help="where the feature files go (default: a temporary directory)")
    p.add_argument("--out", help="result JSON (default: benchmarks/results/eval_scale_<preset>.json)")
    # worker mode (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--test-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.task = args.worker
        args.grid = [float(g) for g in args.grid.split(",")] if args.grid else None
        worker(args)
        return 0

    cfg = dict(PRESETS[args.preset])
    for key in ("dim", "classes", "test", "device", "dtype", "max_iter", "sep", "resident_mib"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.sizes:
        cfg["sizes"] = [int(s) for s in args.sizes.split(",")]
    if args.grid:
        cfg["grid"] = [float(g) for g in args.grid.split(",")]
    if args.tasks:
        cfg["tasks"] = args.tasks.split(",")
    if cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("eval_scale: --device cuda, but torch sees no GPU here; use --preset cpu or --device cpu")
            return 0

    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        test = tmp / "test.npy"
        write_features(test, cfg["test"], cfg["dim"], cfg["classes"], cfg["dtype"], seed=1, sep=cfg["sep"])
        for n in cfg["sizes"]:
            train = tmp / f"train_{n}.npy"
            t = time.perf_counter()
            write_features(train, n, cfg["dim"], cfg["classes"], cfg["dtype"], seed=0, sep=cfg["sep"])
            file_mib = train.stat().st_size / 2**20
            print(f"N={n}: wrote {file_mib:.0f} MiB in {time.perf_counter() - t:.0f} s", flush=True)
            for task in cfg["tasks"]:
                res = run_task(task, train, test, cfg, args.threads, args.timeout)
                res.update({"task": task, "n": n, "file_mib": file_mib})
                if "peak_rss_mib" in res:
                    res["peak_over_file"] = res["peak_rss_mib"] / file_mib
                rows.append(res)
                print(json.dumps(res), flush=True)
            train.unlink()
            train.with_suffix(".labels.npy").unlink()

    table = Table(title=f"eval_scale --preset {args.preset}: D={cfg['dim']}, C={cfg['classes']}, "
                  f"{cfg['test']} test rows, {cfg['device']}, {cfg['dtype']}")
    for col in ("N", "task", "seconds", "peak RSS MiB", "after imports", "file MiB", "peak / file", "top-1", "note"):
        table.add_column(col, justify="right")
    for r in rows:
        if r.get("error"):
            note = r["error"]
        elif r["task"] == "probe":
            note = f"wd {r['weight_decay']:g}, {r['fit']['iterations']} it"
        elif r["task"] == "evals":
            note = (f"one evaluation: streamed {min(r['streamed_s']):.2f} s, resident {min(r['resident_s']):.2f} s "
                    f"({r['streamed_over_resident']:.2f}x)")
        else:
            note = json.dumps(r.get("budgets", r.get("backend", "")))
        table.add_row(str(r["n"]), r["task"], f"{r.get('seconds', float('nan')):.1f}",
                      f"{r.get('peak_rss_mib', float('nan')):.0f}", f"{r.get('rss_after_imports_mib', float('nan')):.0f}",
                      f"{r['file_mib']:.0f}",
                      f"{r.get('peak_over_file', float('nan')):.2f}",
                      f"{r['top1']:.2f}" if "top1" in r else "-", note[:90])
    Console(width=160).print(table)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"eval_scale_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "config": cfg, "threads": args.threads, "command": " ".join(sys.argv),
            "host": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_avg": os.getloadavg()}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
