"""The ``selfsup`` command: pretrain, features, probe, knn, sweep, report, plot, demo, shard.

Errors from bad input or options are printed as one line (``selfsup: error: ...``), not a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import typing
from pathlib import Path

from selfsup.errors import SelfsupError

TRAINER_FLAGS = {
    "max_epochs": (int, "epochs to train"),
    "max_steps": (int, "optimiser steps to train (-1: no limit; overrides --max-epochs when reached first)"),
    "max_time": (str, "stop after this wall time: 90s, 3m, 1h30m or DD:HH:MM:SS (a checkpoint is written; "
                 "--resume continues, with the limit counted afresh)"),
    "devices": (str, "devices per node: 'auto', a count, or a list like '0,1'"),
    "num_nodes": (int, "number of nodes (multi-node DDP under torchrun or SLURM)"),
    "strategy": (str, "Lightning strategy: auto, ddp, ddp_spawn, fsdp, ..."),
    "accelerator": (str, "cpu, gpu, mps or auto"),
    "precision": (str, "32-true, 16-mixed, bf16-mixed, ..."),
    "accumulate_grad_batches": (int, "accumulate gradients over this many batches"),
    "log_every_n_steps": (int, "logging interval in steps (at most one epoch's steps)"),
    "check_val_every_n_epoch": (int, "run the online probe's validation every N epochs"),
    "fast_dev_run": (int, "run N training (and validation) batches only, to check a setup; writes no checkpoint"),
}
DATA_FLAGS = {
    "data": (str, "an ImageNet-layout folder, 'wds:DIR' (WebDataset tar shards: train-*.tar, validation-*.tar), "
             "'cifar10:ROOT', 'cifar100:ROOT', 'stl10:ROOT', 'svhn:ROOT' or 'digits' (the embedded default)"),
    "batch_size": (int, "images per batch per device"),
    "num_workers": (int, "data loader workers for streamed folders (default: up to 8)"),
    "image_size": (int, "square image size the data is resized to (default: the data's own, 224 for large images)"),
    "cache_dir": (str, "where decoded small datasets are cached (default: $SELFSUP_CACHE or ~/.cache/selfsup)"),
    "crop_pct": (float, "evaluation views of large images: shorter side to image-size / crop-pct, then the centre "
                 "crop (0.875: 256 then 224)"),
    "decode": (str, "where large images are decoded: 'loader' (DataLoader workers) or 'device' (workers only read "
               "bytes; the batch is decoded, cropped and resized on the training device, nvJPEG on a GPU)"),
}


def _crop_pct(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _devices(value: str):
    if value == "auto":
        return value
    if "," in value:
        return [int(v) for v in value.split(",") if v]
    return int(value)


def _duration(text: str) -> str | None:
    from selfsup.config import parse_duration

    try:
        return parse_duration(text, "--max-time")
    except SelfsupError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--max-time ")) from None


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``selfsup: error: ...``), not the usage block."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _arg_type(annotation):
    """argparse type for an annotation like ``int``, ``float | None`` or ``str``; ``none`` parses as None."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing})  # annotations are postponed strings
    args = typing.get_args(annotation)
    base = next((a for a in args if a is not type(None)), annotation)
    base = base if base in (int, float, str, bool) else str
    if type(None) not in args or base is bool:
        return base

    def optional(text: str):
        return None if text.lower() == "none" else base(text)

    optional.__name__ = base.__name__
    return optional


def add_method_arguments(parser: argparse.ArgumentParser, method: str) -> None:
    """``method``'s own options group, from its declarations (:mod:`selfsup.methods_spec`; nothing heavy imported)."""
    from selfsup.methods_spec import method_spec

    group = parser.add_argument_group(f"{method} options (see --method for others)")
    for name, spec in method_spec(method).items():
        if name in DATA_FLAGS:  # e.g. CPC's image_size follows the data's --image-size
            continue
        typ = _arg_type(spec.annotation)
        text = spec.help.replace("%", "%%")
        kw = {"default": argparse.SUPPRESS, "help": f"{text} (default: {spec.default!r})".strip()}
        if typ is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(_flag(name), type=typ, metavar=typ.__name__.upper(), **kw)


def _with_default(text: str, default) -> str:
    """``text (default: X)``, X the value the run takes without the flag; ``text`` if it already says."""
    if "(default" in text or "the embedded default" in text:
        return text
    shown = "none" if default is None else default
    return f"{text} (default: {shown})"


def build_pretrain_parser(sub, method: str) -> argparse.ArgumentParser:
    from selfsup.methods_spec import method_names

    p = sub.add_parser(
        "pretrain", help="pretrain an encoder without labels",
        description="Pretrain a self-supervised method. Writes runs/<name>/ (config.yaml, checkpoints/, "
        "metrics.csv, metrics.json, export/). `selfsup pretrain --method NAME --help` lists that method's options. "
        "The defaults shown are used when neither the flag nor a --config file sets the value.",
    )
    p.add_argument("--method", default="rotation",
                   help=f"method to pretrain: {', '.join(method_names())} (default: rotation)")
    p.add_argument("--config", help="a config.yaml to start from (a previous run's reruns it); flags override it")
    p.add_argument("--output", default=argparse.SUPPRESS, help="parent folder of run directories (default: runs)")
    p.add_argument("--name", default=argparse.SUPPRESS, help="run name (default: <method>-<backbone>, numbered if taken)")
    p.add_argument("--resume", action="store_true", help="continue run --name from its last checkpoint")
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="random seed (default: 0)")
    p.add_argument("--checkpoint-every", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="also write a checkpoint every N optimiser steps, so a kill loses at most N steps "
                   "(default: once per epoch only)")
    p.add_argument("--keep-checkpoints", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="keep the N newest numbered checkpoints besides last.ckpt; 0 keeps all (default: 2). "
                   "The newest, which --resume uses, is never removed; sigterm.ckpt and interrupt.ckpt go once "
                   "a newer checkpoint exists")
    p.add_argument("--no-online-probe", dest="online_probe", action="store_false", default=argparse.SUPPRESS,
                   help="do not train the online linear probe")
    p.add_argument("--tensorboard", action="store_true", default=argparse.SUPPRESS, help="also log to TensorBoard")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Lightning's own start-up messages and model summary (hidden by default)")
    p.add_argument("--skip-bad-images", dest="skip_bad", action="store_true", default=argparse.SUPPRESS,
                   help="skip (and count) corrupt or non-image files instead of stopping")
    from selfsup.config import DATA_DEFAULTS, TRAINER_DEFAULTS

    g = p.add_argument_group("data")
    for name, (typ, hlp) in DATA_FLAGS.items():
        g.add_argument(_flag(name), type=typ, default=argparse.SUPPRESS, help=_with_default(hlp, DATA_DEFAULTS[name]))
    g = p.add_argument_group("trainer (Lightning)")
    for name, (typ, hlp) in TRAINER_FLAGS.items():
        kind = {"devices": _devices, "max_time": _duration}.get(name, typ)
        g.add_argument(_flag(name), type=kind, default=argparse.SUPPRESS,
                       help=_with_default(hlp, TRAINER_DEFAULTS[name]))
    add_method_arguments(p, method)
    return p


def build_demo_parser(sub) -> argparse.ArgumentParser:
    from selfsup.demo import EPOCHS, KS, SEEDS  # the demo's constants: torch is imported only when it runs

    budgets = ", ".join("all" if k is None else str(k) for k in KS)
    p = sub.add_parser(
        "demo", help="pretrain rotation on the embedded digits and compare with a random-init encoder",
        description="Pretrains rotation prediction on scikit-learn's bundled digits (no files, no network), prints "
        "online-probe, linear-probe and kNN accuracy of the pretrained encoder, a random-init encoder of the same "
        f"architecture and raw pixels, then runs a label-efficiency sweep ({budgets} labelled images per class) and "
        "plots it (runs/<name>/eval/sweep.png). With the defaults it takes about a minute on 2 idle CPU cores (104 CPU-seconds), "
        "several times longer on a busy machine; --epochs and --seeds scale it.",
    )
    p.add_argument("--epochs", type=_positive, default=EPOCHS, help=f"pretraining epochs (default: {EPOCHS})")
    p.add_argument("--seeds", type=_positive, default=SEEDS,
                   help=f"subset seeds of the label-efficiency sweep (default: {SEEDS})")
    p.add_argument("--backbone", default="convnet_small", help="backbone (default: convnet_small)")
    p.add_argument("--output", default="runs", help="parent folder of the demo's run directory (default: runs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return p


def _int_list(text: str) -> list[int | None]:
    try:
        values = [None if v in ("all", "none") else int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers or 'all', got {text!r}") from None
    if any(v is not None and v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"labels per class must be at least 1, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"percents must be in (0, 100], got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def build_eval_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("source", nargs="?", help="a run directory (runs/<name>), an export directory, or a "
                        "Lightning checkpoint of a run (runs/<name>/checkpoints/last.ckpt; results then go to "
                        "runs/<name>/eval/checkpoint-last/)")
    common.add_argument("--random-init", metavar="BACKBONE", help="evaluate a randomly initialised BACKBONE instead")
    common.add_argument("--data", help="dataset spec (default: the run's training data)")
    common.add_argument("--image-size", type=_positive, help="resize images to this size (default: the run's)")
    common.add_argument("--crop-pct", type=_crop_pct, default=None,
                        help="large images: shorter side resized to image-size / crop-pct, then the centre crop "
                        "(default: the run's, else 0.875: 256 then 224)")
    common.add_argument("--batch-size", type=_positive, default=256, help="extraction batch size (default: 256)")
    common.add_argument("--dtype", choices=["float32", "float16"], default=None,
                        help="feature storage dtype (default: float32; float16 with --layers, whose ~9,000-dim "
                        "layers are large)")
    common.add_argument("--layers", default=None, metavar="LAYERS",
                        help="layer-wise evaluation (Goyal et al. 2019): 'all', 'last', stage indices counted from 0 "
                        "(e.g. 2,3,4) or names (layer3,out); sweep also takes 'best', the layer whose full-label "
                        "probe scores best on held-out training labels. Every stage is read in one pass, "
                        "average-pooled to ~9,000 dims and cached per layer; the random-init floor is read at the "
                        "same layers (default: the encoder's output only, 'out')")
    common.add_argument("--skip-bad-images", dest="skip_bad", action=argparse.BooleanOptionalAction, default=None,
                        help="skip (and count) corrupt or non-image files instead of stopping (default: as the run "
                        "was pretrained; off for an export directory or --random-init)")
    common.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="skip the random-init and raw-pixel baselines")
    common.add_argument("--output", help="results directory, created if missing (default: <run>/eval, or "
                        "<run>/eval/<data-name>-<size>px-<hash>/ for other data or another image size)")
    common.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda", "mps"],
                        help="where features are extracted: cpu, gpu (= cuda), mps or auto (default: auto)")
    common.add_argument("--devices", type=_devices, default=1,
                        help="devices per node for extraction and, with --strategy ddp, for the fits: a sweep "
                        "spreads its fits over them, a probe splits its training rows over them (DDP when > 1)")
    common.add_argument("--num-nodes", type=int, default=1,
                        help="nodes for extraction (and, under ddp, the sweep's fits or the probe's rows)")
    common.add_argument("--strategy", default="auto",
                        help="Lightning strategy for extraction (ddp for several devices; a sweep then spreads its "
                        "fits over them, a probe is then data-parallel: one fit, rows split, gradients summed)")
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the probe, kNN and sweep fits run (default: auto, cuda when torch sees a GPU)")
    sub.add_parser("features", parents=[common], help="extract and cache features of the train and test splits",
                   description="Run the frozen encoder (eval mode, no augmentation) over every image of the data's "
                   "train and test splits, and of the baselines (a random-init encoder of the same architecture, "
                   "raw pixels; --no-baselines skips them), and cache the features, one safetensors file per "
                   "encoder and split, in <run>/features/ (--random-init: in the --output folder's features/, "
                   "default runs/random-<BACKBONE>/features/). probe, knn, sweep, plot and report read them from "
                   "there instead of extracting again; a cached file is reused, not rewritten. Prints each "
                   "encoder's train and test feature shapes and files.")
    sub.add_parser("probe", parents=[common], help="linear probe on cached features, with baselines",
                   description="Multinomial logistic regression on standardised cached features, L2 strength "
                   "chosen on held-out training labels; the random-init floor and raw pixels beside. With "
                   "--strategy ddp --devices N (--num-nodes M) the probe is data-parallel: each process reads "
                   "its block of the cached training rows, the standardisation statistics and every loss and "
                   "gradient are summed over the processes, and all take the same L-BFGS steps (the result "
                   "equals one process's within float32 rounding); rank 0 writes probe.json.")
    p = sub.add_parser("knn", parents=[common], help="kNN classification on cached features, with baselines",
                       description="Cosine kNN on cached features (faiss): majority vote, or weighted with --temperature.")
    p.add_argument("--k", type=_positive, default=20, help="neighbours (default: 20; Wu et al. use 200 with T=0.07)")
    p.add_argument("--temperature", type=_positive_float, help="weighted vote exp(sim/T) (default: majority vote)")
    p = sub.add_parser("sweep", parents=[common], help="label-efficiency sweep: accuracy vs labels per class, plot",
                       description="Linear probe and kNN on k labelled images per class (and percent of labels), "
                       "several seeds, with baselines; writes sweep.json and sweep.png.")
    p.add_argument("--ks", type=_int_list, default=[1, 2, 5, 10, 20, 50, 100, None],
                   help="labels per class, 'all' for every label (default: 1,2,5,10,20,50,100,all)")
    p.add_argument("--percents", type=_float_list, default=[], help="percent of labels, e.g. 1,10,100")
    p.add_argument("--subset-file", dest="subset_files", action="append", default=[], metavar="FILE",
                   help="a standard subset: one image file name or relative path per line (e.g. SimCLR's ImageNet "
                   "1percent.txt / 10percent.txt; not shipped); repeatable")
    p.add_argument("--seeds", type=_positive, default=3, help="subset seeds (default: 3)")
    p.add_argument("--methods", default="linear,knn", help="linear, knn or both (default: linear,knn)")
    p.add_argument("--finetune", action="store_true", help="also fine-tune the whole encoder on each subset (slow)")
    p.add_argument("--supervised", action="store_true",
                   help="also train the same backbone from scratch on each subset (the supervised baseline)")
    p.add_argument("--finetune-steps", type=_positive, default=300,
                   help="training steps per subset for --finetune/--supervised (default: 300)")


def build_view_parsers(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page comparing runs (tables, curves, pictures)",
                       description="Evaluate each run from its cached features (the random-init floor and raw "
                       "pixels beside it) and write one HTML page with every image embedded: config, probe and kNN "
                       "table, label-efficiency curves of all runs (from `selfsup sweep`), training curves, "
                       "nearest-neighbour retrieval, an embedding map and, where a run has them, samples.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (runs/<name>)")
    p.add_argument("-o", "--output", default="report.html",
                   help="the page to write, or a folder (existing, or ending in /) to write report.html in; folders "
                   "are created (default: report.html)")
    p.add_argument("--data", help="dataset spec to evaluate on (default: each run's training data)")
    p.add_argument("--no-pictures", dest="pictures", action="store_false",
                   help="tables and curves only: no retrieval grid or embedding map")
    p.add_argument("--layers", default=None, metavar="LAYERS",
                   help="also probe these layers of each run and its random-init floor (all, stage indices or "
                   "names, as for probe) and draw accuracy per layer")
    p = sub.add_parser("plot", help="write one picture of a run as a PNG",
                       description="retrieval: test images and their nearest training images in feature space, "
                       "wrong-class neighbours framed red; embedding: a 2-D map of test features coloured by class "
                       "(PCA, or t-SNE with --tsne); curves: training curves from metrics.csv; augmentations: what the "
                       "run's method trains on, a row per training image (the loaded view, then every input its "
                       "network reads: rotations, tiles, patch grids, lightness, ...).")
    p.add_argument("run", metavar="RUN", help="a run directory (runs/<name>)")
    p.add_argument("kind", choices=["retrieval", "embedding", "curves", "augmentations"], help="which picture")
    p.add_argument("-o", "--output", help="PNG path (.png is added when it has no suffix), or a folder (existing, "
                   "or ending in /) to write <kind>.png in; folders are created (default: RUN/eval/<kind>.png)")
    p.add_argument("--data", help="dataset spec (default: the run's training data)")
    p.add_argument("--tsne", action="store_true", help="embedding: t-SNE instead of PCA (slower)")
    p.add_argument("--queries", type=_positive, default=8, help="retrieval: query images (default: 8)")
    p.add_argument("--k", type=_positive, default=8, help="retrieval: neighbours per query (default: 8)")
    p.add_argument("--images", type=_positive, default=6, help="augmentations: training images, one row each "
                   "(default: 6)")
    p.add_argument("--seed", type=int, default=0, help="augmentations: which images and which random views "
                   "(default: 0)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def check_retrieval_sizes(queries: int, k: int, n_train: int, n_test: int, data: str) -> None:
    """A one-line :class:`ConfigError` when ``plot retrieval`` asks for more queries or neighbours than the data has."""
    from selfsup.errors import ConfigError

    if queries > n_test:
        raise ConfigError(f"--queries {queries} is more than the {n_test} test images of {data}; "
                          f"give at most {n_test}")
    if k > n_train:
        raise ConfigError(f"--k {k} is more than the {n_train} training images of {data}; give at most {n_train}")


def output_file(given: str | None, default: Path, name: str) -> Path:
    """Where ``-o`` writes: ``default`` without it; ``DIR/name`` for a folder (existing, or given with a
    trailing ``/``); else the path, with ``name``'s suffix added when it has none."""
    if not given:
        return default
    path = Path(given)
    if path.is_dir() or given.endswith(("/", os.sep)):
        return path / name
    return path if path.suffix else path.with_name(path.name + Path(name).suffix)


def _run_view(args: argparse.Namespace) -> None:
    if args.command == "report":
        from selfsup.eval.page import write_report

        out = output_file(args.output, Path("report.html"), "report.html")
        path = write_report(args.runs, out, data=args.data, pictures=args.pictures, progress=True, layers=args.layers)
        print(f"report: {path} (open it in a browser; it needs no network)")
        return
    from selfsup.eval import harness, viz
    from selfsup.eval.page import _run_dir

    run = _run_dir(args.run)
    out = output_file(args.output, run / "eval" / f"{args.kind}.png", f"{args.kind}.png")
    if args.kind == "curves":
        fig = viz.training_curves(run / "metrics.csv", title=run.name)
    elif args.kind == "augmentations":
        from selfsup.eval.views import run_views, views_figure

        items, classes, method = run_views(run, count=args.images, seed=args.seed, data=args.data)
        fig = views_figure(items, classes, title=f"{run.name}: what {method} trains on")
    else:
        src = harness.resolve_source(str(run))
        ev = harness.prepare(src, data=args.data, baselines=False)
        if not args.output:  # another --data than the run's: beside that data's results, not over the run's own
            out = harness.results_dir_for(src, ev) / f"{args.kind}.png"
        train, test = ev.features[src.name]
        if args.kind == "retrieval":
            check_retrieval_sizes(args.queries, args.k, len(ev.train), len(ev.test), ev.spec)
            fig = viz.retrieval_grid(ev.train, ev.test, train.x, test.x, queries=args.queries, k=args.k, title=src.name)
        else:
            fig = viz.embedding_map(test.x, test.y, ev.test.classes, method="tsne" if args.tsne else "pca",
                                    title=f"{src.name}, test split")
    print(f"{args.kind}: {viz.save(fig, out)}")


def _eval_world(args: argparse.Namespace) -> int:
    """How many processes a ``--devices N --num-nodes M --strategy ddp`` evaluation runs."""
    if args.strategy != "ddp":
        return 1
    devices = args.devices
    if devices == "auto":
        import torch

        per_node = max(1, torch.cuda.device_count()) if args.accelerator != "cpu" else 1
    else:
        per_node = len(devices) if isinstance(devices, list) else int(devices)
    return per_node * args.num_nodes


def _launch_ranks(args: argparse.Namespace):
    """Start the sweep's ranks (Lightning Fabric re-runs this command line per rank) and return the Fabric."""
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy="ddp")
    fabric.launch()
    return fabric


def _gather_dicts(local: dict) -> dict:
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def skipped_ks_note(ks, labels) -> str | None:
    """The line saying which ``--ks`` the sweep left out (more than the largest class: "all"), or None."""
    import numpy as np

    largest = int(np.unique(np.asarray(labels), return_counts=True)[1].max())
    over = [k for k in ks if k is not None and k > largest]
    if not over:
        return None
    return (f"note: --ks {','.join(map(str, over))} left out: no class has more than {largest} training images, "
            "so those budgets are the same subset as 'all'")


def check_devices(accelerator: str = "auto", device: str = "auto") -> None:
    """A one-line :class:`ConfigError` when ``--accelerator`` or ``--device`` names hardware torch does not see."""
    import torch

    from selfsup.errors import ConfigError

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given, but torch sees no CUDA GPU here (use --device cpu or auto)")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--accelerator {accelerator} was given, but torch sees no CUDA GPU here "
                          "(use --accelerator cpu or auto)")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--accelerator mps was given, but torch sees no Apple MPS device here "
                          "(use --accelerator cpu or auto)")


def check_eval_arguments(args: argparse.Namespace) -> None:
    """The one-line errors of features, probe, knn, sweep, report and plot that need no torch, before it is imported."""
    from selfsup.errors import ConfigError
    from selfsup.runs import check_encoder_source, finished_run_dir

    if args.command == "report":
        for run in args.runs:
            finished_run_dir(run)
        return
    if args.command == "plot":
        finished_run_dir(args.run)
        return
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a file; --output takes the results directory (the JSON "
                          "files, and a sweep's PNG, are written into it)")
    if args.layers is not None and args.layers.strip() == "best" and args.command != "sweep":
        raise ConfigError(f"--layers best is chosen by a probe for the sweep; `selfsup {args.command}` takes all, last, "
                          "stage indices or names (use --layers all to see every layer and the best marked)")
    check_encoder_source(args.source, args.random_init)


def _run_eval(args: argparse.Namespace) -> None:
    import time

    import torch

    from selfsup.eval import harness

    started = time.perf_counter()
    check_devices(args.accelerator, args.device)
    fabric = None
    if args.command in ("sweep", "probe") and _eval_world(args) > 1:
        # every rank extracts its share, then runs its share of the sweep's fits, or its rows of each probe
        fabric = _launch_ranks(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and fabric is not None:
        device = f"cuda:{fabric.local_rank}"
    src = harness.resolve_source(args.source, args.random_init, args.output)
    trainer_kwargs = {"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes,
                      "strategy": args.strategy}
    layers = args.layers
    best = layers is not None and layers.strip() == "best"
    dtype = args.dtype or ("float16" if layers is not None else "float32")
    ev = harness.prepare(src, args.data, args.image_size, baselines=args.baselines, dtype=dtype,
                         batch_size=args.batch_size, trainer_kwargs=trainer_kwargs, skip_bad=args.skip_bad,
                         layers="all" if best else layers, crop_pct=args.crop_pct)
    from selfsup.runs import is_launcher_rank_zero

    if args.command == "sweep":
        shard = None if fabric is None else (fabric.global_rank, fabric.world_size)
        best_layers = None
        if best:  # the full-label probe of every layer, on held-out training labels (never the test split)
            saved = harness.results_dir_for(src, ev) / harness.result_name("probe", layers="all")
            rows = harness.saved_results(saved, ev, "probe", {"linear_probe": harness.probe_settings()})
            if rows is not None:
                print(f"best layers from {saved} (its provenance matches: same data, settings and features)")
            best_layers = harness.keep_best_layers(ev, rows or harness.evaluate(ev, "probe", device=device))
            for name, chosen in best_layers.items():
                print(f"{name}: layer {chosen['layer']} (held-out training top-1 {chosen['val_top1']:.1f}%)")
        paths = harness.sweep(ev, src, ks=args.ks, percents=args.percents, seeds=list(range(args.seeds)),
                              methods=args.methods.split(","), finetune=args.finetune, supervised=args.supervised,
                              finetune_steps=args.finetune_steps, subset_files=args.subset_files, device=device,
                              shard=shard, gather=None if fabric is None else _gather_dicts, started=started,
                              best_layers=best_layers, name=harness.result_name("sweep", layers=layers)[:-5])
        if paths is not None:
            import json

            print(f"results: {paths[0]}  plot: {paths[1]}")
            notes = (skipped_ks_note(args.ks, ev.train.labels),
                     harness.classes_under_k_note(json.loads(paths[0].read_text())))
            for note in filter(None, notes):
                print(note)
        return
    if fabric is None and not is_launcher_rank_zero():  # extraction was distributed; kNN runs once, on rank 0
        return
    if args.command == "features":
        for name, per_layer in ev.targets().items():
            for layer, (train, test) in per_layer.items():
                what = name if ev.layers is None else f"{name} [{layer}]"
                print(f"{what}: train {tuple(train.x.shape)} -> {train.path}; test {tuple(test.x.shape)} -> {test.path}")
    else:
        from selfsup.eval.shard import Shard

        kw = {"k": args.k, "temperature": args.temperature} if args.command == "knn" else {}
        shard = Shard.process_group() if fabric is not None else None  # probe: every rank fits on its rows
        rows = harness.evaluate(ev, args.command, device=device, shard=shard, **kw)
        if fabric is not None and fabric.global_rank != 0:  # the ranks hold the same result: rank 0 writes it
            return
        settings = {**kw, **({"linear_probe": harness.probe_settings()} if args.command == "probe" else {})}
        world = 1 if fabric is None else fabric.world_size
        extra = {**kw, "provenance": harness.provenance(ev, src, started, device, world, settings)}
        path = harness.report(ev, args.command, rows, harness.results_dir_for(src, ev), extra=extra,
                              name=harness.result_name(args.command, **kw, layers=layers))
        print(f"results: {path}")


def _pretrain_config(args: argparse.Namespace) -> tuple[dict, bool]:
    from selfsup.config import load_config
    from selfsup.methods_spec import method_arguments

    given = vars(args)
    cfg: dict = load_config(given["config"]) if given.get("config") else {}
    if cfg:  # check the file on its own first, so its errors name it
        from selfsup.config import default_config, merge_config, validate_config

        try:
            method = cfg.get("method", given["method"])
            validate_config(merge_config(default_config(method), cfg))
        except SelfsupError as e:
            raise type(e)(f"{given['config']}: {e}") from None
    if "method" not in cfg or given["method_given"]:
        cfg["method"] = given["method"]
    for section, names in (("data", [*DATA_FLAGS, "skip_bad"]), ("trainer", TRAINER_FLAGS),
                           ("model", [n for n in method_arguments(cfg["method"]) if n not in DATA_FLAGS])):
        for n in names:
            if n in given:
                cfg.setdefault(section, {})[n] = given[n]
    for n in ("output", "name", "seed", "online_probe", "tensorboard", "checkpoint_every", "keep_checkpoints",
              "verbose"):
        if n in given:
            cfg[n] = given[n]
    return cfg, given["resume"]


def _dispatch(args: argparse.Namespace) -> None:
    """Run the parsed command."""
    if args.command == "pretrain":
        cfg, resume = _pretrain_config(args)
        if not resume:  # every value checked before torch and Lightning are imported (a resume needs the run's)
            from selfsup.config import default_config, merge_config, validate_config

            validate_config(merge_config(default_config(cfg["method"]), cfg))
        from selfsup.train import pretrain

        result = pretrain(cfg, resume=resume)
        samples = result.run_dir / "samples"
        shown = f", samples in {samples}" if samples.is_dir() else ""
        if result.stopped_by_time:
            print(f"stopped at the time limit (--max-time {result.stopped_by_time}) after "
                  f"{result.global_step} steps; run written to {result.run_dir} (encoder of that step in "
                  f"{result.run_dir / 'export'}{shown}); continue it with: {result.resume_command}")
        else:
            print(f"run written to {result.run_dir} (encoder in {result.run_dir / 'export'}{shown})")
    elif args.command in ("features", "probe", "knn", "sweep", "report", "plot"):
        check_eval_arguments(args)
        (_run_view if args.command in ("report", "plot") else _run_eval)(args)
    elif args.command == "shard":
        _run_shard(args)
    elif args.command == "demo":
        from selfsup.demo import run_demo

        run_demo(epochs=args.epochs, backbone=args.backbone, output=args.output, seed=args.seed,
                 seeds=args.seeds)


def build_shard_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "shard", help="write WebDataset tar shards of an ImageNet-layout folder (for --data wds:OUT)",
        description="Write ROOT's train and val (or test) images as WebDataset shards in OUT "
                    "(train-000000.tar, ..., validation-000000.tar, ...; each sample KEY.jpg, KEY.cls, KEY.json) "
                    "plus selfsup_shards.json. Each shard is written under a temporary name and renamed when "
                    "complete; rerunning the same command completes an interrupted run.")
    p.add_argument("root", help="the ImageNet-layout folder: ROOT/train/<class>/<image>, ROOT/val/<class>/<image>")
    p.add_argument("out", help="the folder to write the shards to (created)")
    p.add_argument("--max-resolution", type=int, default=None, metavar="N",
                   help="cap the longer side at N pixels, re-encoding only larger images (default: keep every "
                        "image's bytes)")
    p.add_argument("--shard-size", default="1000", metavar="SIZE",
                   help="samples per shard (1000) or bytes per shard, counted on the source files "
                        "(500MB, 1GB) (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one shuffle of the train samples (default: 0)")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="processes that read, check and re-encode images (default: up to 8 cores for 2,000 "
                        "images or more)")
    p.add_argument("--skip-bad-images", dest="skip_bad", action="store_true",
                   help="leave out, and count, files that are not images or do not decode, instead of stopping")
    return p


def _run_shard(args: argparse.Namespace) -> None:
    try:
        import webdataset  # noqa: F401
    except ImportError:
        raise SelfsupError("selfsup shard needs the webdataset package: pip install 'selfsup[shards]'") from None
    from selfsup.data.shard_writer import write_shards

    meta = write_shards(args.root, args.out, max_resolution=args.max_resolution, shard_size=args.shard_size,
                        skip_bad=args.skip_bad, seed=args.seed, workers=args.num_workers)
    counts = ", ".join(f"{s} {v['samples']} samples in {len(v['shards'])} shards" for s, v in meta["splits"].items())
    skipped = f"; skipped {len(meta['skipped_images'])} bad image(s)" if meta["skipped_images"] else ""
    print(f"shards written to {Path(args.out).resolve()}: {counts}{skipped}; use --data wds:{args.out}")


def build_parser(method: str = "rotation") -> argparse.ArgumentParser:
    """The ``selfsup`` parser, ``pretrain`` showing ``method``'s options (the docs' CLI reference renders it)."""
    parser = _Parser(prog="selfsup", description="Self-supervised representation learning for images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build_pretrain_parser(sub, method)
    build_eval_parsers(sub)
    build_view_parsers(sub)
    build_demo_parser(sub)
    build_shard_parser(sub)
    return parser


def _printable_names() -> None:
    """Print a path that is not UTF-8 (its bytes are lone surrogates in Python) with backslash escapes, as
    stderr does, instead of failing with ``UnicodeEncodeError`` after the work is done (a UTF-8 locale's
    stdout is strict)."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    """The ``selfsup`` command; its exit status. Ctrl-C and SIGTERM end it with one line, 130 or 143."""
    from selfsup.startup import Terminated, command_signals, ignore_further_signals, what

    _printable_names()
    with command_signals():
        try:
            return _main(argv)
        except (KeyboardInterrupt, Terminated) as err:
            ignore_further_signals()  # a second Ctrl-C does not cut the line short
            signum = signal.SIGINT if isinstance(err, KeyboardInterrupt) else signal.SIGTERM
            print(f"selfsup: {what(signum)}", file=sys.stderr)
            return 128 + signum


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *argv]  # DDP's launcher re-runs the command line
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="rotation")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    method = known.method
    try:
        if known.config and "--method" not in argv:
            from selfsup.config import load_config

            method = load_config(known.config).get("method", method)
        from selfsup.methods_spec import method_names

        methods = method_names()  # from declarations: nothing heavy is imported to parse or to refuse
        if argv[:1] == ["pretrain"] and (not isinstance(method, str) or method not in methods):
            from selfsup.config import unknown_name_message

            where = f"{known.config}: " if known.config and "--method" not in argv else ""
            raise SelfsupError(where + unknown_name_message("method", method, methods))
    except SelfsupError as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)

    parser = build_parser(method if isinstance(method, str) and method in methods else "rotation")
    args = parser.parse_args(argv)
    args.method_given = any(a == "--method" or a.startswith("--method=") for a in argv)
    from selfsup.quiet import one_line_warnings

    try:
        with one_line_warnings():  # selfsup's own warnings: one line each, once
            _dispatch(args)
    except SelfsupError as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except OSError as e:  # read-only or full disk, a vanished file: name it in one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"selfsup: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
