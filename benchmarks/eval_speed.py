"""Evaluation speed: cached-feature probes and sweeps vs. re-forwarding the frozen backbone, and scikit-learn.

On real CIFAR-10 (50k train / 10k test JPEGs in ImageNet layout) with a randomly initialised, seeded
encoder (``torch.manual_seed(0)``; ``ImageEncoder(Backbone(name))``), measures:

1. ``selfsup.extract_features`` of train + test into a fresh cache directory, and the second call (cache hit).
2. On the cached features: ``linear_probe`` (time, top-1), ``knn_classify`` (k=20 majority; k=200, T=0.07)
   and the full ``label_efficiency_sweep`` (ks 1,2,5,10,20,50,100,all; 3 seeds; linear + kNN).
3. The peers' way: an ``nn.Linear`` head trained for E epochs with the frozen backbone (eval mode,
   no grad) re-run on every batch of every epoch. Its time for E epochs against the full sweep's time
   (target >= 10x), and its accuracy against the probe's (target: equal within noise).
4. scikit-learn ``LogisticRegression`` (lbfgs, multinomial) at the probe's chosen C = 1/(wd*N) on the same
   standardised features, and ``KNeighborsClassifier(20, algorithm="brute", metric="cosine")``.
5. Peak resident memory of the ``selfsup sweep`` CLI on CIFAR-10 in a subprocess (target < 2 GB).

    python benchmarks/eval_speed.py --preset cpu --data /tmp/cifar/cifar10   # ~10 min on 2 cores
    python benchmarks/eval_speed.py --preset gpu --data /path/to/cifar10      # cifar_resnet18, E=100 run in full

Without ``--data`` the CIFAR-10 tarball ``../shared/data/cifar10-jpeg.tar.gz`` (relative to the repo) is
extracted once into ``$SELFSUP_CACHE/bench-data`` (default ``~/.cache/selfsup/bench-data``); when neither
exists the benchmark prints why and exits 0. Writes ``benchmarks/results/eval_speed.json`` and prints a
rich table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import selfsup  # noqa: E402
from selfsup.data import load_dataset  # noqa: E402
from selfsup.eval import knn_classify, linear_probe  # noqa: E402
from selfsup.eval.label_efficiency import label_efficiency_sweep  # noqa: E402
from selfsup.eval.linear import _mean_std, fit_logistic, topk_accuracy  # noqa: E402
from selfsup.ssl.backbone import Backbone  # noqa: E402
from selfsup.ssl.module import ImageEncoder  # noqa: E402

PRESETS = {
    "cpu": {
        # cifar_resnet18 runs at ~170 images/s on 2 cores (measured: 1.48 s per batch of 256), i.e.
        # ~6 min per extraction of the 60k images and ~5 min per re-forward epoch; convnet_small runs at
        # ~1.2k images/s. So the CPU preset uses convnet_small on the full data set.
        "backbone": "convnet_small",
        "device": "cpu",
        "epochs": 30,            # E: epochs of the peers' re-forward probe
        "timed_epochs": 2,       # re-forward epochs actually run (the fastest one is extrapolated to E)
        "cli_backbone": "convnet_small",
        "reps": 3,               # repeats of the cheap measurements (best is kept)
    },
    "gpu": {
        "backbone": "cifar_resnet18",
        "device": "cuda",
        "epochs": 100,           # solo-learn's linear-eval length
        "timed_epochs": 100,     # run in full
        "cli_backbone": "cifar_resnet18",
        "reps": 3,
    },
}
SWEEP_KS = (1, 2, 5, 10, 20, 50, 100, None)
SWEEP_SEEDS = (0, 1, 2)
CLI_KS = "1,10,100,all"
PEER = {"optimizer": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 256,
        "schedule": "cosine over E epochs",
        "head": "BatchNorm1d(affine=False) + Linear on the pooled features (MAE's linear-probe head); plain "
                "SGD on the raw features reached only 22.7% after 30 epochs (feature std ~0.016)"}
MEM_TARGET = 2 * 2**30


# ------------------------------------------------------------------------------------------------ helpers


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import faiss
        import sklearn

        info["sklearn"], info["faiss"] = sklearn.__version__, faiss.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_of(fn, reps: int, device: str = "cpu"):
    """(best seconds, result of the last call): the minimum is the least disturbed by other jobs."""
    times, out = [], None
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times), out, times


def find_data(arg: str | None) -> tuple[Path | None, str]:
    """The CIFAR-10 root (with train/ and test/ or val/), or None and why not."""
    if arg:
        p = Path(arg).expanduser()
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
            return extract_tarball(p)
        if (p / "train").is_dir():
            return p, f"given: {p}"
        if (p / "cifar10" / "train").is_dir():
            return p / "cifar10", f"given: {p}"
        return None, f"--data {arg}: no train/ folder there"
    tarball = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    if not tarball.is_file():
        return None, f"no --data given and no tarball at {tarball}"
    return extract_tarball(tarball)


def extract_tarball(tarball: Path) -> tuple[Path | None, str]:
    cache = Path(os.environ.get("SELFSUP_CACHE") or Path.home() / ".cache" / "selfsup") / "bench-data"
    root = cache / "cifar10"
    if (root / "train").is_dir():
        return root, f"extracted earlier from {tarball} into {cache}"
    tmp = Path(tempfile.mkdtemp(dir=cache.parent if cache.parent.is_dir() else None, prefix="bench-data-"))
    print(f"extracting {tarball} into {cache} ...")
    with tarfile.open(tarball) as tf:
        tf.extractall(tmp, filter="data")
    if not (tmp / "cifar10" / "train").is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        return None, f"{tarball} has no cifar10/train/"
    cache.mkdir(parents=True, exist_ok=True)
    os.replace(tmp / "cifar10", root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root, f"extracted from {tarball} into {cache}"


def make_encoder(name: str) -> nn.Module:
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return ImageEncoder(Backbone(name)).eval()
    finally:
        torch.random.set_rng_state(state)


# ------------------------------------------------------------------------------------------------ peers' probe


def peer_loader(dataset, batch_size: int, seed: int, epoch: int):
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(dataset), generator=gen)
    yield from order.split(batch_size)


def peer_head(dim: int, classes: int, epochs: int, steps_per_epoch: int, device: str):
    torch.manual_seed(0)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, classes)).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=PEER["lr"], momentum=PEER["momentum"],
                          weight_decay=PEER["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    return head, opt, sched


def peer_step(head, opt, sched, feats, labels) -> None:
    loss = nn.functional.cross_entropy(head(feats), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def peer_reforward(encoder, train, test, epochs_total: int, epochs_run: int, device: str, bs: int):
    """The peers' loop: every batch of every epoch goes through the frozen backbone again."""
    n = len(train)
    steps = math.ceil(n / bs)
    head, opt, sched = peer_head(encoder.num_features, len(train.classes), epochs_total, steps, device)
    encoder = encoder.to(device).eval()
    sync(device)
    epoch_times = []
    for epoch in range(epochs_run):
        t = time.perf_counter()
        head.train()
        for idx in peer_loader(train, bs, 0, epoch):
            imgs, labels = train.__getitems__(idx.tolist())
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.no_grad():
                feats = encoder(imgs)
            peer_step(head, opt, sched, feats, labels)
        sync(device)
        epoch_times.append(time.perf_counter() - t)
    # one test pass (the backbone again), as a peer's final evaluation
    t = time.perf_counter()
    head.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, len(test), bs):
            imgs, _ = test.__getitems__(list(range(start, min(start + bs, len(test)))))
            logits.append(head(encoder(imgs.to(device))))
    logits = torch.cat(logits)
    sync(device)
    test_time = time.perf_counter() - t
    top1 = topk_accuracy(logits, torch.as_tensor(test.labels, device=logits.device), (1,))[0]
    return {"epoch_seconds": epoch_times, "test_pass_seconds": test_time, "top1": top1,
            "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}}


def peer_replay(train_x, train_y, test_x, test_y, classes, epochs_total, epochs_run, device, bs):
    """The same head, optimiser, schedule and batch order on the cached features (identical inputs)."""
    n = train_x.shape[0]
    steps = math.ceil(n / bs)
    head, opt, sched = peer_head(train_x.shape[1], classes, epochs_total, steps, device)
    heads = {}
    for epoch in range(epochs_run):
        for idx in peer_loader(range(n), bs, 0, epoch):
            idx = idx.to(device)
            peer_step(head, opt, sched, train_x[idx], train_y[idx])
        heads[epoch + 1] = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    head.eval()
    with torch.no_grad():
        top1 = topk_accuracy(head(test_x), test_y, (1,))[0]
    return top1, heads


# ------------------------------------------------------------------------------------------------ CLI memory


def tree_rss_kib(pid: int) -> int:
    """Summed VmRSS (KiB) of ``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_cli(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` under /usr/bin/time -v when present; poll the process tree's summed RSS as well."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    timing_file = tempfile.NamedTemporaryFile(suffix=".time", delete=False).name
    full = [time_bin, "-v", "-o", timing_file, *cmd] if time_bin else cmd
    peak, stop = [0], threading.Event()
    t = time.perf_counter()
    proc = subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_kib(proc.pid))
            stop.wait(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    seconds = time.perf_counter() - t
    maxrss = None
    if time_bin:
        for line in Path(timing_file).read_text().splitlines():
            if "Maximum resident set size" in line:
                maxrss = int(line.rsplit(":", 1)[1]) * 1024
    Path(timing_file).unlink(missing_ok=True)
    return {"rc": proc.returncode, "seconds": seconds, "time_v_maxrss_bytes": maxrss,
            "polled_tree_rss_peak_bytes": peak[0] * 1024, "output_tail": out[-3000:]}


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--data", help="CIFAR-10 root in ImageNet layout (train/<class>/*.jpg, test/...) or the tarball")
    ap.add_argument("--backbone", help="override the preset's backbone")
    ap.add_argument("--epochs", type=int, help="E, epochs of the re-forward probe (default: the preset's)")
    ap.add_argument("--skip-cli", action="store_true", help="skip the selfsup sweep CLI memory run")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "eval_speed.json"))
    args = ap.parse_args()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    from rich.console import Console
    from rich.table import Table

    console = Console()
    data, data_note = find_data(args.data)
    if data is None:
        console.print(f"[yellow]eval_speed: skipped, no CIFAR-10 data ({data_note}).[/yellow]")
        return 0
    cfg = dict(PRESETS[args.preset])
    if args.backbone:
        cfg["backbone"] = cfg["cli_backbone"] = args.backbone
    if args.epochs:
        cfg["epochs"] = args.epochs
        cfg["timed_epochs"] = min(cfg["timed_epochs"], args.epochs)
    device = cfg["device"]
    if device == "cuda" and not torch.cuda.is_available():
        console.print("[yellow]eval_speed: --preset gpu needs CUDA; none found. Use --preset cpu.[/yellow]")
        return 0
    reps, E, bs = cfg["reps"], cfg["epochs"], PEER["batch_size"]
    result: dict = {"benchmark": "eval_speed", "command": command, "cwd": os.getcwd(), "preset": args.preset,
                    "config": {**cfg, "peer_probe": PEER, "sweep_ks": "1,2,5,10,20,50,100,all",
                               "sweep_seeds": list(SWEEP_SEEDS)},
                    "machine": machine(), "loadavg_start": loadavg(), "data": str(data), "data_note": data_note}
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="selfsup-eval-speed-"))
    try:
        # data: decoded once into the uint8 cache (timed; a hit when decoded by an earlier run)
        t = time.perf_counter()
        train = load_dataset(str(data), "train")
        test = load_dataset(str(data), "val")
        result["data_load_seconds"] = time.perf_counter() - t
        result["n_train"], result["n_test"] = len(train), len(test)
        console.print(f"data: {len(train)} train / {len(test)} test, {train.image_size}px "
                      f"({result['data_load_seconds']:.1f}s to load)")

        # 1. extraction (fresh cache dir), then the cache hit
        encoder = make_encoder(cfg["backbone"])
        cache = work / "features"
        t = time.perf_counter()
        ftr = selfsup.extract_features(encoder, train, "train", cache_dir=cache, progress=False)
        fte = selfsup.extract_features(encoder, test, "val", cache_dir=cache, progress=False)
        t_extract = time.perf_counter() - t
        t_hit, _, hit_all = best_of(lambda: (selfsup.extract_features(encoder, train, "train", cache_dir=cache),
                                             selfsup.extract_features(encoder, test, "val", cache_dir=cache)), reps)
        rows.append({"what": f"extract_features train+test ({cfg['backbone']}, {len(train) + len(test)} images)",
                     "seconds": t_extract, "top1": None, "target": "-", "met": None})
        rows.append({"what": "extract_features again (cache hit, includes hashing the weights)",
                     "seconds": t_hit, "top1": None, "target": "-", "met": None})
        console.print(f"extraction {t_extract:.1f}s, cache hit {t_hit:.3f}s, dim {ftr.x.shape[1]}")

        # 2. probes on the cached features
        tx, ty, vx, vy = ftr.x, ftr.y, fte.x, fte.y
        if device == "cuda":  # the probes and kNN run on the GPU when the features are there
            tx, ty, vx, vy = (torch.from_numpy(np.asarray(a)).to(device) for a in (tx, ty, vx, vy))
        t_probe, probe, probe_all = best_of(lambda: linear_probe(tx, ty, vx, vy), reps, device)
        wd = probe["weight_decay"]
        console.print(f"linear_probe {t_probe:.2f}s top1 {probe['top1']:.2f} (wd {wd:g}, C {probe['C']:.3g})")
        t_knn20, knn20, _ = best_of(lambda: knn_classify(tx, ty, vx, vy, k=20), reps, device)
        t_knn200, knn200, _ = best_of(lambda: knn_classify(tx, ty, vx, vy, k=200, temperature=0.07), reps, device)
        console.print(f"knn k=20 {t_knn20:.2f}s {knn20['top1']:.2f}; k=200 T=.07 {t_knn200:.2f}s {knn200['top1']:.2f}")
        t = time.perf_counter()
        sweep = label_efficiency_sweep({"random-init": (tx, ty, vx, vy)}, ks=SWEEP_KS, seeds=SWEEP_SEEDS,
                                       dataset_key=train.name, progress=False)
        sync(device)
        t_sweep = time.perf_counter() - t
        n_fits = sum(len({r["seed"] for r in b["runs"]}) for b in sweep["results"]["random-init"]["linear"])
        sweep_all = sweep["results"]["random-init"]
        console.print(f"sweep {t_sweep:.1f}s")

        # the probe's own single fit at the chosen strength (what scikit-learn is asked to do)
        stats = _mean_std(torch.as_tensor(np.asarray(ftr.x)).to(device), torch.device(device))
        xs = ((torch.as_tensor(np.asarray(ftr.x)).to(device) - stats[0]) / stats[1])
        xs_test = ((torch.as_tensor(np.asarray(fte.x)).to(device) - stats[0]) / stats[1])
        ys = torch.as_tensor(np.asarray(ftr.y)).to(device)
        t_fit, (w, b), _ = best_of(lambda: fit_logistic(xs, ys, wd, num_classes=10, max_iter=500, tol=1e-4),
                                   reps, device)
        fit_top1 = topk_accuracy(xs_test @ w + b, torch.as_tensor(np.asarray(fte.y)).to(device), (1,))[0]

        rows += [
            {"what": f"linear_probe (L-BFGS, wd path 1..1e-6 on a 20% hold-out + refit), chose wd={wd:g}",
             "seconds": t_probe, "top1": probe["top1"], "target": "-", "met": None},
            {"what": "fit_logistic at the chosen wd only (one full-batch L-BFGS fit)",
             "seconds": t_fit, "top1": fit_top1, "target": "-", "met": None},
            {"what": "knn_classify k=20 majority (faiss)", "seconds": t_knn20, "top1": knn20["top1"],
             "target": "-", "met": None},
            {"what": "knn_classify k=200 T=0.07 (faiss)", "seconds": t_knn200, "top1": knn200["top1"],
             "target": "-", "met": None},
            {"what": f"label_efficiency_sweep ks 1..100,all x {len(SWEEP_SEEDS)} seeds, linear+kNN "
                     f"({n_fits} linear fits)", "seconds": t_sweep,
             "top1": sweep_all["linear"][-1]["top1_mean"], "target": "-", "met": None},
        ]

        # 3. the peers' way: re-run the frozen backbone on every batch of every epoch
        console.print(f"re-forward probe: running {cfg['timed_epochs']} of E={E} epochs ...")
        enc_dev = make_encoder(cfg["backbone"]).to(device)
        peer = peer_reforward(enc_dev, train, test, E, cfg["timed_epochs"], device, bs)
        epoch_s = float(min(peer["epoch_seconds"]))  # the fastest epoch: favours the re-forward probe
        extrapolated = cfg["timed_epochs"] < E
        t_peer = (E * epoch_s if extrapolated else float(sum(peer["epoch_seconds"]))) + peer["test_pass_seconds"]
        # its accuracy after E epochs: the identical head, optimiser, schedule and batch order on the
        # identical inputs (eval-mode backbone, no augmentation, so every epoch sees the cached features)
        ctx = torch.as_tensor(np.asarray(ftr.x)).to(device)
        cty = torch.as_tensor(np.asarray(ftr.y)).to(device)
        cvx = torch.as_tensor(np.asarray(fte.x)).to(device)
        cvy = torch.as_tensor(np.asarray(fte.y)).to(device)
        t = time.perf_counter()
        replay_top1, replay_heads = peer_replay(ctx, cty, cvx, cvy, 10, E, E, device, bs)
        t_replay = time.perf_counter() - t
        k = cfg["timed_epochs"]
        head_diff = max(float((peer["head"][n] - replay_heads[k][n]).abs().max()) for n in peer["head"])
        head_scale = max(float(peer["head"][n].abs().max()) for n in peer["head"])
        peer_top1 = peer["top1"] if not extrapolated else replay_top1
        ratio = t_peer / t_sweep
        ratio_probe = t_peer / t_probe
        acc_gap = probe["top1"] - peer_top1
        note = (f"{k} epochs timed, fastest {epoch_s:.1f}s x E={E} extrapolated + 1 test pass"
                if extrapolated else f"E={E} epochs run in full + 1 test pass")
        rows.append({"what": f"re-forward probe: BN+nn.Linear, SGD(0.1, m=0.9) cosine, bs {bs}, E={E} ({note})",
                     "seconds": t_peer, "top1": peer_top1, "target": "-", "met": None})
        rows.append({"what": f"  same head on cached features, E={E} epochs (the cache's version of it)",
                     "seconds": t_replay, "top1": replay_top1, "target": "-", "met": None})
        rows.append({"what": "ratio re-forward probe (E epochs) / full sweep on cached features",
                     "seconds": None, "ratio": ratio, "top1": None, "target": ">= 10x", "met": ratio >= 10})
        rows.append({"what": f"accuracy: linear_probe {probe['top1']:.2f} vs re-forward {peer_top1:.2f}",
                     "seconds": None, "top1": None, "gap": acc_gap,
                     "target": "equal within noise (|gap| <= 1 pt)", "met": abs(acc_gap) <= 1.0})

        # 4. scikit-learn on the same standardised features
        from sklearn.linear_model import LogisticRegression
        from sklearn.neighbors import KNeighborsClassifier

        xs_np, xt_np = xs.cpu().numpy(), xs_test.cpu().numpy()
        y_np, yt_np = np.asarray(ftr.y), np.asarray(fte.y)
        C = 1.0 / (wd * len(y_np))

        def sk_lr():
            m = LogisticRegression(C=C, solver="lbfgs", max_iter=500, tol=1e-4)
            m.fit(xs_np, y_np)
            return m

        t_sk, sk, _ = best_of(sk_lr, max(1, reps - 1))
        sk_top1 = 100.0 * float((sk.predict(xt_np) == yt_np).mean())
        sk_iters = int(np.max(sk.n_iter_))
        raw_tr, raw_te = np.asarray(ftr.x), np.asarray(fte.x)

        def sk_knn():
            m = KNeighborsClassifier(n_neighbors=20, algorithm="brute", metric="cosine")
            m.fit(raw_tr, y_np)
            return m.predict(raw_te)

        t_skknn, sk_pred, _ = best_of(sk_knn, reps)
        skknn_top1 = 100.0 * float((sk_pred == yt_np).mean())
        rows += [
            {"what": f"sklearn LogisticRegression lbfgs C=1/(wd*N)={C:.3g} ({sk_iters} iterations)",
             "seconds": t_sk, "top1": sk_top1, "target": "slower than our probe", "met": None},
            {"what": "  our linear_probe (with the wd search) faster at matching accuracy?",
             "seconds": None, "top1": None, "ratio": t_sk / t_probe,
             "target": "probe faster, |top1 gap| <= 0.5", "met": t_probe < t_sk and abs(probe["top1"] - sk_top1) <= 0.5},
            {"what": "  our single fit at that C faster at matching accuracy?",
             "seconds": None, "top1": None, "ratio": t_sk / t_fit,
             "target": "fit faster, |top1 gap| <= 0.5", "met": t_fit < t_sk and abs(fit_top1 - sk_top1) <= 0.5},
            {"what": "sklearn KNeighborsClassifier k=20 brute cosine", "seconds": t_skknn, "top1": skknn_top1,
             "target": "slower than knn_classify", "met": None},
            {"what": "  knn_classify (faiss) k=20 faster than sklearn?", "seconds": None, "top1": None,
             "ratio": t_skknn / t_knn20, "target": "faster", "met": t_knn20 < t_skknn},
        ]
        rows[-5]["met"] = rows[-4]["met"]
        rows[-2]["met"] = rows[-1]["met"]

        # 5. peak memory of the selfsup sweep CLI (fresh feature cache: extraction is part of the run)
        cli = None
        if not args.skip_cli:
            exe = Path(sys.executable).with_name("selfsup")
            cli_cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "selfsup"]),
                       "sweep", "--random-init", cfg["cli_backbone"], "--data", str(data),
                       "--output", str(work / "cli" / "eval"), "--seeds", "1", "--ks", CLI_KS]
            if device == "cuda":
                cli_cmd += ["--accelerator", "gpu"]
            console.print("CLI: " + " ".join(cli_cmd))
            cli = run_cli(cli_cmd, dict(os.environ))
            cli["command"] = " ".join(shlex.quote(c) for c in cli_cmd)
            peak = max(cli["time_v_maxrss_bytes"] or 0, cli["polled_tree_rss_peak_bytes"])
            cli["peak_bytes"] = peak
            rows.append({"what": f"selfsup sweep CLI peak RSS ({cfg['cli_backbone']} random-init + pixels "
                                 f"baseline, ks {CLI_KS}, 1 seed; extraction included)",
                         "seconds": cli["seconds"], "top1": None, "mem_gb": peak / 2**30, "target": "< 2 GB",
                         "met": cli["rc"] == 0 and peak < MEM_TARGET})
            if cli["rc"] != 0:
                console.print(f"[red]CLI failed (rc {cli['rc']}):[/red]\n{cli['output_tail']}")

        result.update({
            "rows": rows,
            "linear_probe": {k: v for k, v in probe.items() if k != "model"},
            "linear_probe_all_seconds": probe_all,
            "knn20": knn20, "knn200": knn200,
            "sweep": {"seconds": t_sweep, "summary": {
                m: [{k: b[k] for k in ("budget", "n_labels", "top1_mean", "top1_std")} for b in sweep_all[m]]
                for m in sweep_all}},
            "peer_probe": {"epochs": E, "timed_epochs": k, "extrapolated": extrapolated,
                           "epoch_seconds": peer["epoch_seconds"], "test_pass_seconds": peer["test_pass_seconds"],
                           "seconds_for_E_epochs": t_peer, "top1_after_timed_epochs": peer["top1"],
                           "top1_after_E_epochs": peer_top1,
                           "accuracy_source": ("replay of the identical loop on the cached features (inputs are "
                                               "identical: eval-mode backbone, no augmentation)") if extrapolated
                           else "measured on the re-forward run",
                           "max_abs_head_diff_reforward_vs_replay_after_timed_epochs": head_diff,
                           "head_max_abs": head_scale, "replay_seconds": t_replay},
            "ratio_reforward_over_sweep": ratio, "ratio_reforward_over_one_probe": ratio_probe,
            "sklearn": {"logreg_seconds": t_sk, "logreg_top1": sk_top1, "logreg_iters": sk_iters, "C": C,
                        "knn_seconds": t_skknn, "knn_top1": skknn_top1},
            "our_fit_at_C": {"seconds": t_fit, "top1": fit_top1},
            "cli": cli,
            "loadavg_end": loadavg(),
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"eval_speed ({args.preset} preset, {cfg['backbone']}, CIFAR-10 {len(train)}/{len(test)}, "
                        f"load avg {result['loadavg_start']} -> {result['loadavg_end']})")
    for col, just in (("what", "left"), ("seconds", "right"), ("top-1 %", "right"), ("other", "right"),
                      ("target", "left"), ("met", "left")):
        table.add_column(col, justify=just)
    for r in rows:
        other = (f"{r['ratio']:.1f}x" if "ratio" in r else f"{r['gap']:+.2f} pt" if "gap" in r
                 else f"{r['mem_gb']:.2f} GB" if "mem_gb" in r else "")
        met = "" if r["met"] is None else ("yes" if r["met"] else "[red]NO[/red]")
        table.add_row(r["what"], "" if r["seconds"] is None else f"{r['seconds']:.2f}",
                      "" if r["top1"] is None else f"{r['top1']:.2f}", other, r["target"], met)
    console.print(table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
