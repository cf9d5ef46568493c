"""float16 against float32 layer caches: the same features stored both ways, probed per layer (issue 23).

``--layers`` stores each ~9,000-value layer in float16 (half the disk: about 23 GB a layer for 1.28M
images). This measures what that costs in accuracy: it extracts every layer of a run's encoder once in
float32 (the first ``--per-class`` training images of each class and the whole test split), then fits
the linear probe (its L2 search included) on the float32 values and on the same values rounded to
float16, and prints top-1 / top-5 / chosen strength of both per layer.

    python -m selfsup pretrain --method rotation --backbone convnet_small --data /path/to/cifar10 \\
        --max-steps 61 --batch-size 128 --name rot
    python benchmarks/layer_dtype.py runs/rot --data /path/to/cifar10 --per-class 1000

Writes ``benchmarks/results/layer_dtype.json`` (or ``--out``) and prints a table.
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


class Subset:
    """The first ``per_class`` images of each class of a selfsup dataset (a cache key of its own)."""

    def __init__(self, ds, per_class: int) -> None:
        labels = np.asarray(ds.labels)
        self.ds, self.classes, self.image_size = ds, ds.classes, ds.image_size
        self.idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(ds.classes))])
        self.name = f"{ds.name}-first{per_class}"

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        return self.ds[int(self.idx[i])]

    def __getitems__(self, ii):
        return self.ds.__getitems__([int(self.idx[i]) for i in ii])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run directory or export")
    ap.add_argument("--data", required=True, help="an ImageNet-layout folder (train/ and val/ or test/)")
    ap.add_argument("--per-class", type=int, default=1000, help="training images per class (default: 1000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--cache", default=None, help="feature cache folder (default: RUN/../layer_dtype_cache)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layer_dtype.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import selfsup
    from selfsup.data.datasets import load_dataset
    from selfsup.eval.features import extract_features
    from selfsup.eval.linear import linear_probe

    enc = selfsup.load_encoder(args.run)
    train = load_dataset(args.data, "train")
    test = load_dataset(args.data, "val", image_size=train.image_size)
    cache = args.cache or str(Path(args.run).resolve().parent / "layer_dtype_cache")
    tr = extract_features(enc, Subset(train, args.per_class), "train", layers="all", dtype="float32", cache_dir=cache)
    te = extract_features(enc, test, "val", layers="all", dtype="float32", cache_dir=cache)
    rows = {}
    print(f"{'layer':<12} {'dims':>6} {'top-1 f32':>9} {'top-1 f16':>9} {'top-5 f32':>9} {'top-5 f16':>9} {'L2 f32/f16':>12}")
    for layer in tr:
        a, b = tr[layer], te[layer]
        row = {"features": int(a.x.shape[1])}
        for dt in ("float32", "float16"):
            xa = np.asarray(a.x, dtype=np.float32).astype(dt)
            xb = np.asarray(b.x, dtype=np.float32).astype(dt)
            start = time.perf_counter()
            r = linear_probe(xa, a.y, xb, b.y, progress=False)
            row[dt] = {"top1": r["top1"], "top5": r["top5"], "weight_decay": r["weight_decay"],
                       "seconds": time.perf_counter() - start}
        rows[layer] = row
        f32, f16 = row["float32"], row["float16"]
        print(f"{layer:<12} {row['features']:>6} {f32['top1']:>9.2f} {f16['top1']:>9.2f} {f32['top5']:>9.2f} "
              f"{f16['top5']:>9.2f} {f32['weight_decay']:>5g}/{f16['weight_decay']:<5g}", flush=True)
    out = {"benchmark": "layer_dtype", "run": str(args.run), "data": args.data, "train_per_class": args.per_class,
           "train": len(tr[next(iter(tr))].y), "test": len(test), "threads": args.threads,
           "loadavg": os.getloadavg(), "encoder": enc.config if hasattr(enc, "config") else None, "layers": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
