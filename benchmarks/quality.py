"""The results table: every method pretrained on one backbone, data and budget, scored by one harness.

For each method (default: every registered one) the script pretrains with the method's own defaults
(plus the preset's backbone, batch size and budget), exports the encoder, then runs the evaluation
harness on its cached features:

- linear probe top-1 / top-5 (L2 strength chosen on held-out training labels) of the encoder's own
  (last-layer) features, and the linear probe of every stage (``--layers``, Goyal et al. 2019: each
  stage map average-pooled to about 9,000 values, stored in float16) with the best layer chosen on
  the same held-out training labels, never the test split; the floor is probed at the same layers,
- kNN top-1: k=20 majority vote, and k=200 weighted with T=0.07 (Wu et al. 2018),
- label efficiency: 1, 10 and 100 labels per class (linear probe, 3 seeds: mean and std) and 100 % of
  labels (the linear probe above: one fit, std 0),
- bits/dim on the held-out split for the likelihood models (from the run's ``val/bits_per_dim``),

beside the baselines on the same subsets: a random-init encoder of the method's own architecture (the
floor), raw pixels, and the same backbone trained supervised from scratch (fine-tuning each method's
weights too where the preset allows, as in CPC v2's label-efficiency figure).

The ``cpu`` budget is counted in training images (batches, whatever a method's optimiser steps per
batch: a GAN takes two), the same for every method except where the preset names one
(``method_images``: relative position, whose step is the cheapest, gets 100,000); ``--images`` sets
one budget for all.

Every method is resumable: the work directory keeps each run and each finished method's result, so a
command that was cut off (SIGTERM included: it exits 143) continues where it stopped when run again
(``--fresh`` starts over).

    python benchmarks/quality.py --preset cpu-smoke                     # minutes; what CI runs
    python benchmarks/quality.py --preset cpu --threads 2               # 25,000 images a method; each row's minutes are in the table
    python benchmarks/quality.py --preset gpu --data /data/cifar10      # ResNet-18, bf16, channels-last

Writes ``benchmarks/results/quality_<preset>.{json,md,png}`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the repo, or beside its parent for a worktree (/work/wt/<name> -> /work/shared)
ARCHIVE = next((p / "shared" / "data" / "cifar10-jpeg.tar.gz" for p in (ROOT.parent, ROOT.parent.parent)
                if (p / "shared" / "data" / "cifar10-jpeg.tar.gz").is_file()),
               ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")

SUPERVISED = "supervised (same backbone, from scratch)"
KS = (1, 10, 100, None)

PRESETS: dict[str, dict] = {
    # CI: the embedded digits, two optimiser steps per method, one seed; checks the plumbing only.
    "cpu-smoke": {"backbone": "convnet_small", "data": "digits", "image_size": 16, "max_steps": 2, "epochs": 1,
                  "minutes": None, "batch_size": 32, "ks": (1, 10, None), "seeds": (0,), "supervised_steps": 3,
                  "finetune_steps": 0, "precision": "32-true", "model": {}, "layers": "all"},
    # 2 CPU cores: the small backbone, the same number of training images for every method (half an epoch
    # of CIFAR-10; a budget in images, not minutes, so the numbers do not depend on the machine's load).
    "cpu": {"backbone": "convnet_small", "data": None, "image_size": None, "max_steps": -1, "epochs": 1,
            "images": 25_000, "minutes": None, "batch_size": 128, "cpu_batch": True, "ks": KS, "seeds": (0, 1, 2),
            "supervised_steps": 300, "finetune_steps": 0, "precision": "32-true", "layers": "all",
            # CPC's paper-width context network costs 8x this tiny backbone: narrower here (stated in the table)
            # and the GANs' width-64 generator costs ~5x the backbone per image: width 32
            # and a PixelCNN of 6 gated layers of width 48 still costs ~11x the backbone's step (measured on
            # 64 CIFAR-sized images under load; see docs/pixelcnn.md)
            "model": {"cpc": {"context_hidden": 64, "context_blocks": 2}, "dcgan": {"g_width": 32},
                      "bigan": {"g_width": 32, "d_width": 32}, "pixelcnn": {"layers": 6, "hidden": 48}},
            # relative position's step is the cheapest (two 16 px tiles: 0.35x the backbone's step): at 25k
            # images (91 s) it stays below its floor, at 100k (still less compute than rotation's 25k) above
            "method_images": {"relative_position": 100_000}},
    # one GPU: the CIFAR ResNet-18 at 32 px, bf16 autocast, channels-last, the papers' long schedules
    # (capped at an hour a method); CPC predicts in all four directions as the paper does.
    "gpu": {"backbone": "cifar_resnet18", "data": None, "image_size": None, "max_steps": -1, "epochs": 200,
            "minutes": 60.0, "batch_size": 256, "ks": KS, "seeds": (0, 1, 2), "supervised_steps": 3000,
            "finetune_steps": 1000, "precision": "bf16-mixed", "layers": "all",
            "model": {"*": {"channels_last": True}, "cpc": {"directions": "down,up,left,right"}}},
}
# Per-image cost differs by method (CPC encodes 49 patches an image): batch sizes that fit a CPU step.
CPU_BATCH = {"cpc": 32, "jigsaw": 64, "relative_position": 64, "multitask": 64, "vae": 64, "flow": 64, "pixelcnn": 64}


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


def method_images(method: str, preset: dict) -> int | None:
    """The pretraining budget of ``method`` in training images under ``preset`` (None: epochs or minutes)."""
    return preset.get("method_images", {}).get(method, preset.get("images"))


def method_config(method: str, preset: dict, data: str, work: Path, overrides: dict | None = None,
                  name: str | None = None) -> dict:
    """The ``selfsup.train.pretrain`` config of one method under a preset (``overrides``: a variant's options)."""
    from selfsup.ssl.module import METHODS

    trunk = {"backbone": preset["backbone"]} if METHODS[method].uses_backbone else {}  # a flow has none
    model = {**trunk, **preset["model"].get("*", {}), **preset["model"].get(method, {}), **(overrides or {})}
    batch = preset["batch_size"]
    if preset.get("cpu_batch"):
        batch = CPU_BATCH.get(method, batch)
    trainer = {"max_epochs": preset["epochs"], "max_steps": preset["max_steps"], "precision": preset["precision"],
               "check_val_every_n_epoch": 1, "log_every_n_steps": 10}
    images = method_images(method, preset)
    if images:
        # ceil: every method sees the same images; max_steps counts optimiser steps (a GAN takes two a batch);
        # the image budget alone ends the run, however many epochs it spans
        trainer["max_steps"] = -(-images // batch) * METHODS[method].optimizer_steps_per_batch
        trainer["max_epochs"] = -1
    if preset["minutes"]:
        total = int(preset["minutes"] * 60)
        trainer["max_time"] = f"00:{total // 3600:02d}:{total // 60 % 60:02d}:{total % 60:02d}"
    return {"method": method, "model": model, "trainer": trainer, "output": str(work / "runs"), "name": name or method,
            "data": {"data": data, "batch_size": batch, "image_size": preset["image_size"]}, "online_probe": False}


def pretrain_once(cfg: dict, work: Path) -> Path:
    """Pretrain, or continue a run that was cut off, or reuse a finished one; the run directory."""
    from selfsup.checkpoint import atomic_write_text
    from selfsup.runs import check_run_name, is_leftover
    from selfsup.train import pretrain

    run_dir = work / "runs" / check_run_name(cfg["name"], "run name")
    if (run_dir / "metrics.json").is_file() and (run_dir / "export" / "config.json").is_file():
        return run_dir  # finished earlier
    resume = any((run_dir / "checkpoints").glob("*.ckpt"))  # last.ckpt, a step's or the one SIGTERM saved
    if run_dir.is_dir() and not resume and is_leftover(run_dir):
        shutil.rmtree(run_dir)  # a run of ours started but never checkpointed: nothing to keep
    start = time.perf_counter()
    run = pretrain(cfg, resume=resume)
    seconds = time.perf_counter() - start
    timing = run_dir / "pretrain_cost.json"
    before = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0  # earlier, cut-off parts
    cost = {"seconds": before + seconds, "steps": int(run.model.trainer.global_step)}
    atomic_write_text(timing, json.dumps(cost) + "\n")
    return run_dir


def parse_variant(text: str) -> tuple[str, str, dict]:
    """``"cpc:directions=down,up;max_offset=3"`` -> (row label, method, options); values parsed as YAML scalars."""
    import yaml

    method, _, opts = text.partition(":")
    overrides = {}
    for part in filter(None, opts.split(";")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--variant {text!r}: expected METHOD:KEY=VALUE[;KEY=VALUE...]")
        overrides[key.strip()] = yaml.safe_load(value)
    if not overrides:
        raise ValueError(f"--variant {text!r}: name at least one option, METHOD:KEY=VALUE")
    label = f"{method} ({'; '.join(f'{k}={v}' for k, v in overrides.items())})"
    return label, method, overrides


def run_name(label: str) -> str:
    """A row label as a directory and file name: ``cpc (directions=down,up)`` -> ``cpc-directions-down-up``."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-")


def layer_scores(src, ev, preset: dict, scored: dict, memo_file: Path) -> dict[str, dict]:
    """Linear probe of every stage of the encoder and of its random-init floor (raw pixels have one layer).

    The ``out`` layer is the encoder's own features, probed above: its result is reused, not fitted again.
    The best layer is the one with the best held-out *training* top-1 (:func:`selfsup.eval.harness.best_layer`).
    A floor's layers are memoised like its other scores (the same architecture gives the same floor).
    Returns encoder -> ``{"layers": {layer: {top1, val_top1, features, weight_decay}}, "best_layer",
    "best_layer_top1"}``.
    """
    from selfsup.checkpoint import update_json
    from selfsup.eval import harness

    evl = harness.prepare(src, progress=False, batch_size=512, cache_dir=ev.features[src.name][0].path.parent,
                          layers=preset["layers"], dtype=preset.get("layer_dtype", "float16"))
    out = {}
    for name, layers in evl.layers.items():
        if name == "pixels":
            continue
        inner = {layer: pair for layer, pair in layers.items() if layer != "out"}
        key = "layers|" + "|".join(f"{pair[0].path.name}|{pair[1].path.name}" for pair in inner.values())
        memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
        if name != src.name and key in memo:
            out[name] = memo[key]
            continue
        rows = {}
        if inner:
            one = dataclasses.replace(evl, features={name: evl.features[name]}, layers={name: inner})
            rows = harness.evaluate(one, "probe", progress=False)[name]["layers"]
        last = scored[name]["probe"]
        rows["out"] = {k: last.get(k) for k in ("top1", "top5", "weight_decay", "val_top1", "features")}
        best = harness.best_layer(rows)
        out[name] = {"layers": {layer: {k: r.get(k) for k in ("top1", "val_top1", "features", "weight_decay")}
                                for layer, r in rows.items()},
                     "best_layer": best, "best_layer_top1": rows[best]["top1"]}
        if name != src.name:
            update_json(memo_file, {key: out[name]})
    return out


def evaluate_method(method: str, run_dir: Path, preset: dict, supervised_cache: dict) -> dict:
    """Probe, kNN, label efficiency, baselines and bits/dim of one pretrained run."""
    import numpy as np

    from selfsup.checkpoint import update_json
    from selfsup.eval import harness
    from selfsup.eval.finetune import train_classifier
    from selfsup.eval.label_efficiency import label_efficiency_sweep
    from selfsup.ssl.module import load_encoder

    src = harness.resolve_source(str(run_dir))
    # One feature cache for every method: the random-init floors (seeded, so the same weights for the same
    # architecture) and raw pixels are extracted once, and their scores below are computed once.
    ev = harness.prepare(src, progress=False, batch_size=512, cache_dir=run_dir.parent.parent / "features")
    encoders = {name: harness.arrays(pair) for name, pair in ev.features.items()}
    # subsets keyed by the images' relative paths: the same wherever the data lives
    common = {"ks": list(preset["ks"]), "seeds": list(preset["seeds"]), "dataset_key": ev.dataset_key,
              "keys": ev.keys, "progress": False}
    memo_file = run_dir.parent.parent / "results" / "_baselines.json"

    def scores(name: str) -> dict:
        """Probe, kNN and label-efficiency scores of one encoder (a baseline's from the memo when known).

        The memo is read afresh and merged under a lock, so runs sharing a ``--work`` directory reuse
        and keep each other's baselines."""
        pair = ev.features[name]
        key = f"{pair[0].path.name}|{pair[1].path.name}"  # the cache files: named by encoder, data and transform
        memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
        if name != src.name and key in memo:
            return memo[key]
        one = dataclasses.replace(ev, features={name: pair})
        probe = harness.evaluate(one, "probe", progress=False)[name]
        # The sweep's subsets; 100 % of labels is the probe itself (its seeds would only move the L2 hold-out).
        sweep = label_efficiency_sweep({name: encoders[name]}, methods=["linear"],
                                       **{**common, "ks": [k for k in common["ks"] if k is not None]})
        linear = sweep["results"][name]["linear"]
        if None in common["ks"]:
            linear.append({"budget": "all", "top1_mean": probe["top1"], "top1_std": 0.0, "n_labels": probe["n_train"]})
        out = {"probe": probe, "knn20": harness.evaluate(one, "knn", k=20)[name],
               "knn200": harness.evaluate(one, "knn", k=200, temperature=0.07)[name], "sweep": {"linear": linear}}
        if name != src.name:
            update_json(memo_file, {key: out})
        return out

    scored = {name: scores(name) for name in ev.features}
    per_layer = layer_scores(src, ev, preset, scored, memo_file) if preset.get("layers") else {}
    num_classes = len(ev.train.classes)
    any_arrays = next(iter(encoders.values()))

    def classifier(build, lr_scale: float, steps: int):
        def run(name: str, subset: np.ndarray, seed: int) -> dict:
            return train_classifier(build(), ev.train, ev.test, subset, num_classes, steps=steps,
                                    encoder_lr_scale=lr_scale, seed=seed)

        return run

    arch = (preset["backbone"], ev.spec)
    if arch not in supervised_cache and preset["supervised_steps"]:
        from selfsup.ssl.backbone import Backbone
        from selfsup.ssl.module import ImageEncoder

        fn = classifier(lambda: ImageEncoder(Backbone(preset["backbone"])), 1.0, preset["supervised_steps"])
        res = label_efficiency_sweep({SUPERVISED: any_arrays}, methods=["finetune"], finetune_fn=fn, **common)
        supervised_cache[arch] = res["results"][SUPERVISED]["finetune"]
    finetuned = None
    if preset["finetune_steps"]:
        fn = classifier(lambda: load_encoder(run_dir / "export"), 0.1, preset["finetune_steps"])
        res = label_efficiency_sweep({src.name: any_arrays}, methods=["finetune"], finetune_fn=fn, **common)
        finetuned = res["results"][src.name]["finetune"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cost = json.loads((run_dir / "pretrain_cost.json").read_text()) if (run_dir / "pretrain_cost.json").is_file() else {}
    rows = {}
    for name in ev.features:
        role = "method" if name == src.name else ("pixels" if name == "pixels" else "random init")
        sc = scored[name]
        rows[role] = {
            "encoder": name,
            "linear_top1": sc["probe"]["top1"], "linear_top5": sc["probe"]["top5"],
            "knn20_top1": sc["knn20"]["top1"], "knn200_t007_top1": sc["knn200"]["top1"],
            "label_efficiency": {
                e["budget"]: {"mean": e["top1_mean"], "std": e["top1_std"], "n_labels": e["n_labels"]}
                for e in sc["sweep"]["linear"]
            },
            "features": sc["probe"]["features"],
        }
        if name in per_layer:
            rows[role].update(per_layer[name])
    if finetuned:
        rows["method"]["finetune"] = {e["budget"]: {"mean": e["top1_mean"], "std": e["top1_std"]} for e in finetuned}
    return {
        "method": method, "run_dir": str(run_dir), "hparams": src.meta.get("hparams", {}),
        "pretrain_steps": cost.get("steps"), "pretrain_seconds": cost.get("seconds"),
        "bits_per_dim": metrics.get("val/bits_per_dim"),
        "data": ev.spec, "train_images": len(ev.train), "test_images": len(ev.test),
        "rows": rows,
    }


def markdown(results: list[dict], supervised: dict, title: str) -> str:
    """The results table: one row per method, its floor and pixels beside it, supervised last."""
    budgets = list(next(iter(results))["rows"]["method"]["label_efficiency"]) if results else []
    layered = any("best_layer" in r["rows"]["method"] for r in results)
    head = ["method", "linear top-1", *(["best layer top-1", "floor best layer"] if layered else []), "top-5",
            "kNN k=20", "kNN k=200 T=0.07", *[f"linear {b}" for b in budgets],
            "bits/dim", "floor linear", "floor kNN k=20", "images", "minutes"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def le(row: dict, b: str) -> str:
        e = row["label_efficiency"].get(b)
        return "-" if e is None else f"{e['mean']:.1f} ± {e['std']:.1f}"

    def best(row: dict) -> str:
        if "best_layer" not in row:
            return "-"
        return f"{row['best_layer_top1']:.1f} ({row['best_layer']})"

    for r in results:
        m, f = r["rows"]["method"], r["rows"]["random init"]
        beat = "" if m["linear_top1"] > f["linear_top1"] else " (below floor)"
        if layered:
            below = "best_layer" in m and "best_layer" in f and m["best_layer_top1"] <= f["best_layer_top1"]
            layer_cells = [best(m) + (" (below floor)" if below else ""), best(f)]
        else:
            layer_cells = []
        bpd = "-" if r["bits_per_dim"] is None else f"{r['bits_per_dim']:.2f}"
        minutes = "-" if r["pretrain_seconds"] is None else f"{r['pretrain_seconds'] / 60:.1f}"
        lines.append("| " + " | ".join([
            r["method"], f"{m['linear_top1']:.1f}{beat}", *layer_cells, f"{m['linear_top5']:.1f}", f"{m['knn20_top1']:.1f}",
            f"{m['knn200_t007_top1']:.1f}", *[le(m, b) for b in budgets], bpd, f"{f['linear_top1']:.1f}",
            f"{f['knn20_top1']:.1f}", f"{r['pretrain_images']:,}" if r.get("pretrain_images") else "-",
            minutes]) + " |")
    if results:
        p = results[0]["rows"]["pixels"]
        lines.append("| " + " | ".join(["raw pixels (16 px)", f"{p['linear_top1']:.1f}", *(["-", "-"] if layered else []),
                                        f"{p['linear_top5']:.1f}",
                                        f"{p['knn20_top1']:.1f}", f"{p['knn200_t007_top1']:.1f}",
                                        *[le(p, b) for b in budgets], "-", "-", "-", "-", "-"]) + " |")
    for arch, entries in supervised.items():
        cells = {e["budget"]: f"{e['top1_mean']:.1f} ± {e['top1_std']:.1f}" for e in entries}
        lines.append("| " + " | ".join([f"supervised from scratch ({arch})", "-", *(["-", "-"] if layered else []),
                                        "-", "-", "-",
                                        *[cells.get(b, "-") for b in budgets], "-", "-", "-", "-", "-"]) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], supervised: dict, path: Path, title: str) -> Path:
    """One label-efficiency figure: every method, its floors and the supervised baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10")

    def curve(entries: dict) -> tuple[list, list, list]:
        xs, ys, ss = [], [], []
        for e in entries.values():
            xs.append(e["n_labels"])
            ys.append(e["mean"])
            ss.append(e["std"])
        return xs, ys, ss

    for i, r in enumerate(results):
        xs, ys, ss = curve(r["rows"]["method"]["label_efficiency"])
        ax.errorbar(xs, ys, yerr=ss, marker="o", color=colours(i % 10), label=r["method"], capsize=2)
    if results:
        xs, ys, _ = curve(results[0]["rows"]["random init"]["label_efficiency"])
        ax.plot(xs, ys, "--", color="0.45", label=f"random init ({results[0]['method']}'s architecture)")
        xs, ys, _ = curve(results[0]["rows"]["pixels"]["label_efficiency"])
        ax.plot(xs, ys, ":", color="0.3", label="raw pixels")
    for arch, entries in supervised.items():
        xs = [e["n_labels"] for e in entries]
        ax.errorbar(xs, [e["top1_mean"] for e in entries], yerr=[e["top1_std"] for e in entries], color="black",
                    lw=2, marker="s", label=f"supervised from scratch ({arch})", capsize=2)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images (log scale; 1, 10, 100 per class and all)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    import torch

    import selfsup  # noqa: F401  (registers every method)
    from selfsup.checkpoint import atomic_write_text, update_json
    from selfsup.errors import TrainingStopped
    from selfsup.ssl.module import METHODS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--methods", help=f"comma-separated methods (default: all: {','.join(sorted(METHODS))})")
    ap.add_argument("--variant", action="append", default=[], metavar="METHOD:KEY=VALUE[;KEY=VALUE]",
                    help="also run METHOD with these options as a row of its own (repeatable), e.g. "
                    "'cpc:directions=down,up,left,right'")
    ap.add_argument("--data", help="ImageNet-layout root (default: CIFAR-10 from ../shared/data; cpu-smoke: digits)")
    ap.add_argument("--minutes", type=float, help="pretraining wall-clock budget per method (default: the preset's)")
    ap.add_argument("--images", type=int, help="pretraining budget per method in training images (default: the "
                    "preset's; steps = images / batch size)")
    ap.add_argument("--epochs", type=int, help="pretraining epochs per method (default: the preset's)")
    ap.add_argument("--work", help="work directory of runs and per-method results (default: a folder in "
                    "$SELFSUP_CACHE or ~/.cache/selfsup named by the preset); reruns resume from it")
    ap.add_argument("--fresh", action="store_true", help="delete the runs and results this script wrote in the work directory first")
    ap.add_argument("--threads", type=int, help="torch CPU threads (state it with the numbers)")
    ap.add_argument("--layers", help="layers probed besides the last (as `selfsup probe --layers`: all, stage "
                    "indices or names; 'none': the last layer only; default: the preset's, all)")
    ap.add_argument("--out", help="output prefix (default: benchmarks/results/quality_<preset>)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    if args.minutes is not None:
        preset["minutes"] = args.minutes
    if args.epochs is not None:
        preset["epochs"] = args.epochs
    if args.layers is not None:
        preset["layers"] = None if args.layers == "none" else args.layers
    if args.images is not None:
        preset["images"] = args.images
        preset["method_images"] = {}  # one budget for every method
    methods = args.methods.split(",") if args.methods else sorted(METHODS)
    try:
        variants = [parse_variant(v) for v in args.variant]
    except ValueError as err:
        print(f"quality.py: error: {err}", file=sys.stderr)
        return 2
    unknown = [m for m in methods + [v[1] for v in variants] if m not in METHODS]
    if unknown:
        print(f"quality.py: error: unknown methods {unknown}; known: {', '.join(sorted(METHODS))}", file=sys.stderr)
        return 2
    data = args.data or preset["data"]
    if data is None:
        found = find_data(None)
        if found is None:
            print("skipped: CIFAR-10 not found (../shared/data/cifar10-jpeg.tar.gz is absent and no --data given)")
            return 0
        data = str(found)
    cache = Path(os.environ.get("SELFSUP_CACHE", Path.home() / ".cache" / "selfsup"))
    work = Path(args.work) if args.work else cache / f"quality-{args.preset}"
    if args.fresh:  # only what this script writes there: a --work folder may hold the user's own files
        for sub in ("runs", "results"):
            shutil.rmtree(work / sub, ignore_errors=True)
    (work / "results").mkdir(parents=True, exist_ok=True)

    results = []
    sup_file = work / "results" / "_supervised.json"

    def read_supervised() -> dict:  # afresh each time: another run sharing --work may have added one
        text = json.loads(sup_file.read_text()) if sup_file.is_file() else {}
        return {tuple(k.split("|", 1)): v for k, v in text.items()}

    supervised = read_supervised()
    rows = [(m, m, {}) for m in methods] + variants
    for label, method, overrides in rows:
        done = work / "results" / f"{run_name(label)}.json"
        if done.is_file():
            results.append(json.loads(done.read_text()))
            print(f"{label}: done earlier ({done})")
            continue
        print(f"{label}: pretraining ({preset['backbone']}, {data}) ...", flush=True)
        cfg = method_config(method, preset, data, work, overrides, run_name(label))
        try:
            run_dir = pretrain_once(cfg, work)
        except TrainingStopped as err:  # SIGTERM or Ctrl-C: the step was saved, a rerun of this command resumes it
            print(f"quality.py: {label}: {err}", file=sys.stderr)
            return err.exit_code  # 143 for SIGTERM, 130 for Ctrl-C
        print(f"{label}: evaluating ...", flush=True)
        supervised = read_supervised()
        res = evaluate_method(label, run_dir, preset, supervised)
        if res["pretrain_steps"]:  # optimiser steps -> batches -> images
            batches = res["pretrain_steps"] // METHODS[method].optimizer_steps_per_batch
            res["pretrain_images"] = batches * cfg["data"]["batch_size"]
        atomic_write_text(done, json.dumps(res, indent=2) + "\n")
        supervised = read_supervised() | supervised  # keep this run's entry and another run's
        update_json(sup_file, {"|".join(k): v for k, v in supervised.items()})
        results.append(res)

    sup_by_arch = {arch: entries for (arch, _), entries in supervised.items()}
    if preset.get("images"):
        own = [f"{m} {n:,}" for m, n in preset.get("method_images", {}).items() if m in methods]
        budget = (f"{preset['images']:,} training images per method" + (f" ({', '.join(own)})" if own else "")
                  + (f" or {preset['minutes']} min" if preset["minutes"] else ""))
    else:
        budget = (f"{preset['minutes']} min" if preset["minutes"] else f"{preset['max_steps']} steps") + (
            f" (max {preset['epochs']} epochs) per method")
    title = f"{Path(data).name}, {preset['backbone']}, {budget}"
    table = markdown(results, sup_by_arch, title)
    table += ("\nEvery method runs with its own defaults" + (
        f", except (set by the preset): {json.dumps(preset['model'])}" if preset["model"] else "") +
        "; batch sizes: " + ", ".join(f"{m} {method_config(m, preset, data, work)['data']['batch_size']}" for m in methods)
        + ". The floor is a random-init encoder of the method's own architecture.\n")
    print(table)
    prefix = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"quality_{args.preset}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    prefix.with_suffix(".md").write_text(f"{table}\nCommand: `{command}`\n")
    plot(results, sup_by_arch, prefix.with_suffix(".png"), title)
    summary = {
        "benchmark": "quality", "preset": args.preset, "command": command, "data": data,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in preset.items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d")},
        "results": results, "supervised": {"|".join(k): v for k, v in supervised.items()},
    }
    prefix.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {prefix}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
