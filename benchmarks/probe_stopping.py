"""The probe's stopping rule: evaluations and time of the whole L2 search against scikit-learn.

For each problem (synthetic Gaussian classes with overlapping means at 10, 100 and 1,000 classes; real
features when ``--features`` names a cached ``.safetensors`` pair) it measures, interleaved in one process:

- scikit-learn's ``LogisticRegression`` (lbfgs, tol 1e-4) at every C of the probe's grid on the same
  stratified fit / held-out split, its best C by held-out top-1, then refitted on all training rows: the
  reference top-1 and the time (and iterations) of one fit at that C;
- ``selfsup.eval.linear.linear_probe`` under each candidate stopping rule ``(tol, path_tol)``: total
  loss-and-gradient evaluations of the whole search (hold-out fits + final fit), time, chosen strength,
  top-1.

Goal (issue 23): the whole search costs at most 2 scikit-learn fits at the chosen strength and its
top-1 is within 0.2 points of scikit-learn's best.

    python benchmarks/probe_stopping.py --preset cpu     # ~10 min on 2 busy cores

Writes ``benchmarks/results/probe_stopping.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfsup.eval.linear import DEFAULT_WEIGHT_DECAYS, linear_probe, stratified_holdout  # noqa: E402

PRESETS = {
    # (classes, train per class, test per class, dims, class-mean spread): spreads give 40-80% top-1
    "cpu": [(10, 500, 100, 128, 0.35), (100, 60, 20, 128, 0.5), (1000, 12, 4, 64, 0.9)],
    "gpu": [(10, 5000, 1000, 512, 0.35), (100, 500, 100, 512, 0.5), (1000, 100, 50, 2048, 0.6)],
}
RULES = {"current (tol 1e-4, path 1e-3)": (1e-4, None), "tol 1e-3, path 1e-2": (1e-3, 1e-2),
         "tol 1e-2, path 1e-2": (1e-2, 1e-2)}


def synthetic(c: int, per: int, per_test: int, d: int, spread: float, seed: int = 0):
    """Gaussian classes whose means overlap (a low-rank shared structure plus class noise)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(16, d)) / 4
    means = spread * (rng.normal(size=(c, 16)) @ basis + rng.normal(size=(c, d)) / 2)
    ty, vy = np.repeat(np.arange(c), per), np.repeat(np.arange(c), per_test)
    tx = (means[ty] + rng.normal(size=(len(ty), d))).astype(np.float32)
    vx = (means[vy] + rng.normal(size=(len(vy), d))).astype(np.float32)
    return tx, ty, vx, vy


def sklearn_reference(tx, ty, vx, vy, seed: int = 0) -> dict:
    """scikit-learn's own L2 search on the probe's split, then one timed fit at its best C."""
    from sklearn.linear_model import LogisticRegression

    mean, std = tx.mean(0), tx.std(0) + 1e-12
    xs, vs = (tx - mean) / std, (vx - mean) / std
    fit, held = (p.numpy() for p in stratified_holdout(torch.from_numpy(ty), 0.2, seed))
    best = None
    for wd in sorted(DEFAULT_WEIGHT_DECAYS, reverse=True):
        m = LogisticRegression(C=1 / (wd * len(fit)), max_iter=1000, tol=1e-4).fit(xs[fit], ty[fit])
        acc = float((m.predict(xs[held]) == ty[held]).mean())
        if best is None or acc > best[1]:
            best = (wd, acc)
    wd = best[0]
    t = time.perf_counter()
    m = LogisticRegression(C=1 / (wd * len(ty)), max_iter=1000, tol=1e-4).fit(xs, ty)
    seconds = time.perf_counter() - t
    return {"weight_decay": wd, "top1": 100 * float((m.predict(vs) == vy).mean()), "seconds": seconds,
            "iterations": int(np.max(m.n_iter_))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe_stopping.json"))
    args = parser.parse_args()
    rows = []
    for c, per, per_test, d, spread in PRESETS[args.preset]:
        tx, ty, vx, vy = synthetic(c, per, per_test, d, spread)
        sk = sklearn_reference(tx, ty, vx, vy)
        for name, (tol, path_tol) in RULES.items():
            t = time.perf_counter()
            res = linear_probe(tx, ty, vx, vy, tol=tol, path_tol=path_tol)
            seconds = time.perf_counter() - t
            evals = sum(p["evaluations"] for p in res["val_curve"]) + res["fit"]["evaluations"]
            rows.append({"classes": c, "n_train": len(ty), "dims": d, "rule": name, "tol": tol,
                         "path_tol": res["settings"]["path_tol"], "evaluations": evals, "seconds": seconds,
                         "top1": res["top1"], "weight_decay": res["weight_decay"], "sklearn": sk,
                         "fits_of_sklearn": seconds / sk["seconds"], "gap": res["top1"] - sk["top1"],
                         "met": seconds <= 2 * sk["seconds"] and abs(res["top1"] - sk["top1"]) <= 0.2})
            r = rows[-1]
            print(f"C={c:5d} {name:32s} evals {evals:4d} ({sk['iterations']:4d} sklearn iters)  "
                  f"{seconds:6.2f}s = {r['fits_of_sklearn']:4.2f} sklearn fits  top1 {r['top1']:.2f} vs "
                  f"{sk['top1']:.2f} (gap {r['gap']:+.2f})  wd {r['weight_decay']:g} vs {sk['weight_decay']:g}  "
                  f"{'met' if r['met'] else 'NOT met'}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out.write_text(json.dumps({"preset": args.preset, "torch_threads": torch.get_num_threads(), "load": load,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out} (load average {load})")


if __name__ == "__main__":
    main()
