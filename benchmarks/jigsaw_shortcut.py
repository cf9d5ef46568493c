"""How much of a jigsaw puzzle the tiles' low-level statistics solve, with and without the paper's guards.

Noroozi & Favaro (2016, section 3.3) normalise every tile on its own because adjacent tiles share their
brightness and contrast: a model could place tiles from those alone. This script makes puzzles exactly as
:class:`~selfsup.pretext.jigsaw.JigsawTask` hands them to the backbone (training mode), describes each
puzzle by every tile's mean and standard deviation (over its pixels and channels: 18 numbers) or per
channel (54 numbers), and fits a multinomial logistic regression (scikit-learn) that predicts the
permutation from them. Chance is ``1 / num_permutations``.

    python benchmarks/jigsaw_shortcut.py --data /path/to/cifar10 --images 20000

Writes ``benchmarks/results/jigsaw_shortcut.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "before (no per-tile guards)": {"tile_norm": False, "channel_jitter": 0, "grayscale": 0.0},
    "per-tile normalisation only": {"tile_norm": True, "channel_jitter": 0, "grayscale": 0.0},
    "paper's guards (default)": {},
}


def load_images(root: Path, n: int, seed: int = 0):
    """``n`` training images of an ImageNet-layout folder as a uint8 tensor ``(n, 3, S, S)`` (a seeded draw)."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted((root / "train").glob("*/*"))
    if not files:
        raise SystemExit(f"jigsaw_shortcut.py: error: no images under {root / 'train'}")
    pick = np.random.default_rng(seed).choice(len(files), size=min(n, len(files)), replace=False)
    arr = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in pick])  # (n, S, S, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def tile_statistics(images, options: dict, seed: int = 0, batch: int = 512):
    """Per-puzzle tile statistics ``(n, 9, C, 2)`` (mean, std per tile and channel) and permutation labels."""
    import torch

    from selfsup.pretext.jigsaw import JigsawTask
    from selfsup.ssl.module import Normalize

    torch.manual_seed(seed)
    task = JigsawTask(8, **options).train()
    prepare = Normalize()
    stats, labels = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].float() / 255
            tiles, y = task.puzzles(x, prepare)  # (B, 9, C, p, p)
            flat = task.backbone_tiles(tiles)  # (B*9, C, p', p'), what the backbone sees
            flat = flat.view(tiles.shape[0], 9, *flat.shape[1:])  # (B, 9, C, p', p')
            stats.append(torch.stack([flat.mean((-2, -1)), flat.std((-2, -1), unbiased=False)], -1))
            labels.append(y)
    return torch.cat(stats).numpy(), torch.cat(labels).numpy()


def probe(stats, labels, per_channel: bool, train_share: float = 0.8) -> float:
    """Test accuracy (%) of a logistic regression predicting the permutation from the tile statistics."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if per_channel:
        feats = stats.reshape(len(stats), -1)  # (n, 9*C*2)
    else:  # over the tile's pixels and channels: mean of means; std from the channels' moments
        mean = stats[..., 0].mean(-1)  # (n, 9)
        var = (stats[..., 1] ** 2 + stats[..., 0] ** 2).mean(-1) - mean**2
        feats = np.concatenate([mean, np.sqrt(np.maximum(var, 0))], 1)  # (n, 18)
    cut = int(train_share * len(feats))
    scaler = StandardScaler().fit(feats[:cut])
    clf = LogisticRegression(max_iter=300).fit(scaler.transform(feats[:cut]), labels[:cut])
    return 100.0 * float((clf.predict(scaler.transform(feats[cut:])) == labels[cut:]).mean())


def main(argv: list[str] | None = None) -> int:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import find_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="ImageNet-layout root (default: CIFAR-10 from ../shared/data)")
    ap.add_argument("--images", type=int, default=20000, help="puzzles (one per image; 80%% fit, 20%% scored)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "jigsaw_shortcut.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = find_data(args.data)
    if root is None:
        print("skipped: CIFAR-10 not found (../shared/data/cifar10-jpeg.tar.gz is absent and no --data given)")
        return 0
    images = load_images(Path(root), args.images)
    rows = []
    for name, options in SETTINGS.items():
        stats, labels = tile_statistics(images, options)
        rows.append({"setting": name, "options": options, "probe_18_top1": probe(stats, labels, False),
                     "probe_per_channel_top1": probe(stats, labels, True)})
    chance = 100.0 / 100
    print(f"| setting | tile mean+std (18 numbers) | per channel ({9 * 3 * 2} numbers) | chance |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['probe_18_top1']:.1f} % | {r['probe_per_channel_top1']:.1f} % | {chance:.1f} % |")
    command = " ".join(["python", "benchmarks/jigsaw_shortcut.py", *(argv if argv is not None else sys.argv[1:])])
    out = {"benchmark": "jigsaw_shortcut", "command": command, "data": str(root), "images": len(images),
           "chance_top1": chance, "rows": rows,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
