"""The evaluation harness behind ``selfsup features|probe|knn|sweep``: an encoder, its baselines, one cache.

Every report puts the encoder beside two baselines: a randomly initialised encoder of the same
architecture (the honest floor) and raw pixels. Features of all of them are extracted once into the
cache and every probe, kNN and sweep reads them from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.datasets import load_dataset
from selfsup.errors import ConfigError
from selfsup.eval.features import Features, extract_features
from selfsup.ssl.backbone import Backbone
from selfsup.ssl.module import METHODS, ImageEncoder, load_encoder

RANDOM_INIT_SEED = 0


class PixelEncoder(nn.Module):
    """Raw pixels as features: the image area-resized to at most ``size`` px and flattened.

    16 px keeps the baseline cheap at any image size (768 features; 32 px would be 3,072, and its
    probe alone would need over 2 GB on CIFAR-10) while still being the images themselves.

    Shape:
        - Input: ``(B, 3, H, W)`` float in [0, 1] or uint8
        - Output: ``(B, 3 * s * s)`` with ``s = min(size, H)``
    """

    def __init__(self, image_size: int, size: int = 16) -> None:
        super().__init__()
        self.size = min(size, image_size)
        self.num_features = 3 * self.size * self.size
        self.config = {"pixels": self.size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return x.flatten(1)  # (B, 3, s, s) -> (B, 3*s*s)


@dataclass
class EncoderSource:
    """An encoder to evaluate, where its results go, and how to build its random-init twin."""

    name: str
    encoder: nn.Module
    results_dir: Path
    data: str | None
    image_size: int | None
    random_twin: Callable[[], nn.Module]
    meta: dict = field(default_factory=dict)


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        state = torch.random.get_rng_state()
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            enc = build()
        finally:
            torch.random.set_rng_state(state)
        return enc.eval()

    return make


def resolve_source(source: str | None = None, random_init: str | None = None, output: str | None = None) -> EncoderSource:
    """An encoder from a run directory, an export directory, or ``random_init`` (a backbone name)."""
    if (source is None) == (random_init is None):
        raise ConfigError("give either a run or export directory, or --random-init BACKBONE")
    if random_init is not None:
        twin = _seeded(lambda: ImageEncoder(Backbone(random_init)))
        out = Path(output) if output else Path("runs") / f"random-{random_init}" / "eval"
        return EncoderSource(f"random-init {random_init}", twin(), out, None, None, twin)
    path = Path(source)
    export = path / "export" if (path / "export" / "config.json").is_file() else path
    if not (export / "config.json").is_file():
        raise ConfigError(f"{path} is neither a run directory (with export/) nor an export directory")
    encoder = load_encoder(export)
    config = encoder.config
    run_dir = export.parent if export.name == "export" else export
    data_cfg = config.get("data") or {}
    twin = _seeded(lambda: METHODS[config["method"]](**config["hparams"]).encoder())
    name = f"{config['method']} ({run_dir.name})"
    results = Path(output) if output else run_dir / "eval"
    return EncoderSource(name, encoder, results, data_cfg.get("data"), data_cfg.get("image_size"), twin, config)


@dataclass
class EvalData:
    """Train and test splits of a dataset, and the features of every encoder on them."""

    spec: str
    train: object
    test: object
    features: dict[str, tuple[Features, Features]]


def prepare(
    src: EncoderSource,
    data: str | None = None,
    image_size: int | None = None,
    baselines: bool = True,
    cache_dir: str | Path | None = None,
    dtype: str = "float32",
    batch_size: int = 256,
    progress: bool = True,
    trainer_kwargs: dict | None = None,
) -> EvalData:
    """Load the dataset's train and test splits and extract (or read cached) features of the encoder and baselines."""
    spec = data or src.data or "digits"
    size = image_size or (src.image_size if spec == src.data else None)
    train = load_dataset(spec, "train", image_size=size)
    test = load_dataset(spec, "val", image_size=train.image_size)
    encoders = {src.name: src.encoder}
    if baselines:
        if not src.name.startswith("random"):
            encoders["random init (same architecture)"] = src.random_twin()
        encoders["pixels"] = PixelEncoder(train.image_size)
    cache = Path(cache_dir) if cache_dir else src.results_dir.parent / "features"
    feats = {}
    for name, enc in encoders.items():
        kw = dict(batch_size=batch_size, cache_dir=cache, dtype=dtype, progress=progress, **(trainer_kwargs or {}))
        feats[name] = (extract_features(enc, train, "train", **kw), extract_features(enc, test, "val", **kw))
    return EvalData(spec, train, test, feats)


def arrays(pair: tuple[Features, Features]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train, test = pair
    return train.x, train.y, test.x, test.y




def _table(title: str, rows: dict[str, dict], columns: dict[str, str]):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("encoder")
    for label in columns.values():
        table.add_column(label, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(f"{row[key]:.1f}" if isinstance(row[key], float) else str(row[key]) for key in columns))
    return table


def evaluate(ev: EvalData, kind: str, k: int = 20, temperature: float | None = None) -> dict[str, dict]:
    """Linear probe (``kind="probe"``) or kNN (``kind="knn"``) of every encoder on all training labels."""
    from selfsup.eval.knn import knn_classify
    from selfsup.eval.linear import linear_probe

    rows = {}
    for name, pair in ev.features.items():
        if kind == "probe":
            res = linear_probe(*arrays(pair))
            rows[name] = {"top1": res["top1"], "top5": res["top5"], "weight_decay": res["weight_decay"],
                          "features": int(pair[0].x.shape[1])}
        else:
            res = knn_classify(*arrays(pair), k=k, temperature=temperature)
            rows[name] = {"top1": res["top1"], "top5": res["top5"], "features": int(pair[0].x.shape[1])}
    return rows


def report(ev: EvalData, kind: str, rows: dict[str, dict], results_dir: Path, extra: dict | None = None) -> Path:
    """Print a rich table of ``rows`` and write them as JSON under ``results_dir``."""
    from selfsup.eval.report import make_console, write_json

    title = f"{kind} on {ev.spec}: {len(ev.train)} train / {len(ev.test)} test images"
    make_console().print(_table(title, rows, {"top1": "top-1 %", "top5": "top-5 %", "features": "dim"}))
    return write_json({"kind": kind, "data": ev.spec, **(extra or {}), "results": rows}, results_dir / f"{kind}.json")


SUPERVISED = "supervised (same backbone, from scratch)"


def sweep(
    ev: EvalData,
    src: EncoderSource,
    ks=(1, 2, 5, 10, 20, 50, 100, None),
    percents=(),
    seeds=(0, 1, 2),
    methods=("linear", "knn"),
    finetune: bool = False,
    supervised: bool = False,
    finetune_steps: int = 300,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Label-efficiency sweep of every encoder's cached features; JSON, table and PNG under ``src.results_dir``.

    ``finetune`` adds end-to-end fine-tuning of the encoder on each subset (method ``finetune``);
    ``supervised`` adds the same backbone trained from scratch on each subset, as its own line.
    """
    from selfsup.eval.finetune import train_classifier
    from selfsup.eval.label_efficiency import label_efficiency_sweep
    from selfsup.eval.report import make_console, plot_sweep, print_sweep_table, write_json

    encoders = {name: arrays(pair) for name, pair in ev.features.items()}
    common = dict(ks=ks, percents=percents, seeds=seeds, dataset_key=ev.spec, progress=progress)
    result = label_efficiency_sweep(encoders, methods=methods, **common)
    num_classes = len(ev.train.classes)

    def trainer_for(build: Callable[[], nn.Module], lr_scale: float):
        def run(name: str, subset: np.ndarray, seed: int) -> dict:
            return train_classifier(build(), ev.train, ev.test, subset, num_classes, steps=finetune_steps,
                                    encoder_lr_scale=lr_scale, seed=seed)

        return run

    extra = []
    if finetune:
        extra.append((src.name, trainer_for(lambda: src.encoder, 0.1)))
    if supervised:
        extra.append((SUPERVISED, trainer_for(src.random_twin, 1.0)))
    for name, fn in extra:
        res = label_efficiency_sweep({name: encoders[next(iter(encoders))]}, methods=["finetune"], finetune_fn=fn,
                                     **common)
        result["results"].setdefault(name, {}).update(res["results"][name])
        if "finetune" not in result["methods"]:
            result["methods"].append("finetune")
    print_sweep_table(result, make_console())
    out = src.results_dir
    return write_json(result, out / "sweep.json"), plot_sweep(result, out / "sweep.png")
