"""The ``selfsup`` command: pretrain, demo.

Errors from bad input or options are printed as one line (``selfsup: error: ...``), not a traceback.
"""

from __future__ import annotations

import argparse
import sys
import typing

from selfsup.errors import SelfsupError

TRAINER_FLAGS = {
    "max_epochs": (int, "epochs to train"),
    "max_steps": (int, "optimiser steps to train (-1: no limit; overrides --max-epochs when reached first)"),
    "devices": (str, "devices per node: 'auto', a count, or a list like '0,1'"),
    "num_nodes": (int, "number of nodes (multi-node DDP under torchrun or SLURM)"),
    "strategy": (str, "Lightning strategy: auto, ddp, ddp_spawn, fsdp, ..."),
    "accelerator": (str, "cpu, gpu, mps or auto"),
    "precision": (str, "32-true, 16-mixed, bf16-mixed, ..."),
    "accumulate_grad_batches": (int, "accumulate gradients over this many batches"),
    "log_every_n_steps": (int, "logging interval in steps"),
    "check_val_every_n_epoch": (int, "run the online probe's validation every N epochs"),
}
DATA_FLAGS = {
    "data": (str, "an ImageNet-layout folder, 'cifar10:ROOT', 'cifar100:ROOT', 'stl10:ROOT', 'svhn:ROOT' "
             "or 'digits' (the embedded default)"),
    "batch_size": (int, "images per batch per device"),
    "num_workers": (int, "data loader workers for streamed folders (default: up to 8)"),
    "image_size": (int, "square image size the data is resized to (default: the data's own, 224 for large images)"),
    "cache_dir": (str, "where decoded small datasets are cached (default: $SELFSUP_CACHE or ~/.cache/selfsup)"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _devices(value: str):
    if value == "auto":
        return value
    if "," in value:
        return [int(v) for v in value.split(",") if v]
    return int(value)


def _arg_type(annotation):
    """argparse type for an annotation like ``int``, ``float | None`` or ``str``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing})  # annotations are postponed strings
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return base if base in (int, float, str, bool) else str


def add_method_arguments(parser: argparse.ArgumentParser, method: str) -> None:
    from selfsup.train import method_arguments

    group = parser.add_argument_group(f"{method} options (see --method for others)")
    for name, p in method_arguments(method).items():
        typ = _arg_type(p.annotation)
        kw = {"default": argparse.SUPPRESS, "help": f"default: {p.default!r}"}
        if typ is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(_flag(name), type=typ, metavar=typ.__name__.upper(), **kw)


def build_pretrain_parser(sub, method: str) -> argparse.ArgumentParser:
    from selfsup.ssl.module import METHODS

    p = sub.add_parser(
        "pretrain", help="pretrain an encoder without labels",
        description="Pretrain a self-supervised method. Writes runs/<name>/ (config.yaml, checkpoints/, "
        "metrics.csv, metrics.json, export/). `selfsup pretrain --method NAME --help` lists that method's options.",
    )
    p.add_argument("--method", default="rotation", choices=sorted(METHODS), help="method to pretrain (default: rotation)")
    p.add_argument("--config", help="a config.yaml to start from (a previous run's reruns it); flags override it")
    p.add_argument("--output", default=argparse.SUPPRESS, help="parent folder of run directories (default: runs)")
    p.add_argument("--name", default=argparse.SUPPRESS, help="run name (default: <method>-<backbone>, numbered if taken)")
    p.add_argument("--resume", action="store_true", help="continue run --name from its last checkpoint")
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="random seed (default: 0)")
    p.add_argument("--no-online-probe", dest="online_probe", action="store_false", default=argparse.SUPPRESS,
                   help="do not train the online linear probe")
    p.add_argument("--tensorboard", action="store_true", default=argparse.SUPPRESS, help="also log to TensorBoard")
    p.add_argument("--skip-bad-images", dest="skip_bad", action="store_true", default=argparse.SUPPRESS,
                   help="skip (and count) corrupt or non-image files instead of stopping")
    g = p.add_argument_group("data")
    for name, (typ, hlp) in DATA_FLAGS.items():
        g.add_argument(_flag(name), type=typ, default=argparse.SUPPRESS, help=hlp)
    g = p.add_argument_group("trainer (Lightning)")
    for name, (typ, hlp) in TRAINER_FLAGS.items():
        g.add_argument(_flag(name), type=_devices if name == "devices" else typ, default=argparse.SUPPRESS, help=hlp)
    add_method_arguments(p, method)
    return p


def build_demo_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="pretrain rotation on the embedded digits and compare with a random-init encoder",
        description="Pretrains rotation prediction on scikit-learn's bundled digits (no files, no network, "
        "about a minute on 2 CPU cores) and prints a table of probe accuracy: pretrained vs random init.",
    )
    p.add_argument("--epochs", type=int, default=30, help="pretraining epochs (default: 30)")
    p.add_argument("--probe-epochs", type=int, default=30, help="epochs of the frozen-encoder probes (default: 30)")
    p.add_argument("--backbone", default="convnet_small", help="backbone (default: convnet_small)")
    p.add_argument("--output", default="runs", help="parent folder of the demo's run directory (default: runs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return p


def _pretrain_config(args: argparse.Namespace) -> tuple[dict, bool]:
    from selfsup.train import load_config, method_arguments

    given = vars(args)
    cfg: dict = load_config(given["config"]) if given.get("config") else {}
    if "method" not in cfg or given["method_given"]:
        cfg["method"] = given["method"]
    for section, names in (("data", [*DATA_FLAGS, "skip_bad"]), ("trainer", TRAINER_FLAGS),
                           ("model", method_arguments(cfg["method"]))):
        for n in names:
            if n in given:
                cfg.setdefault(section, {})[n] = given[n]
    for n in ("output", "name", "seed", "online_probe", "tensorboard"):
        if n in given:
            cfg[n] = given[n]
    return cfg, given["resume"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *argv]  # DDP's launcher re-runs the command line
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="rotation")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    method = known.method
    if known.config and "--method" not in argv:
        try:
            from selfsup.train import load_config

            method = load_config(known.config).get("method", method)
        except SelfsupError as e:
            print(f"selfsup: error: {e}", file=sys.stderr)
            return 2

    import selfsup  # noqa: F401  (registers the methods)
    from selfsup.ssl.module import METHODS

    parser = argparse.ArgumentParser(
        prog="selfsup", description="Self-supervised representation learning for images."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build_pretrain_parser(sub, method if method in METHODS else "rotation")
    build_demo_parser(sub)
    args = parser.parse_args(argv)
    args.method_given = any(a == "--method" or a.startswith("--method=") for a in argv)
    try:
        if args.command == "pretrain":
            from selfsup.train import pretrain

            cfg, resume = _pretrain_config(args)
            result = pretrain(cfg, resume=resume)
            print(f"run written to {result.run_dir} (encoder in {result.run_dir / 'export'})")
        elif args.command == "demo":
            from selfsup.demo import run_demo

            run_demo(epochs=args.epochs, probe_epochs=args.probe_epochs, backbone=args.backbone,
                     output=args.output, seed=args.seed)
    except SelfsupError as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfsup: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
