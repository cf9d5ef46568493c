"""The evaluation harness behind ``selfsup features|probe|knn|sweep``: an encoder, its baselines, one cache.

Every report puts the encoder beside two baselines: a randomly initialised encoder of the same
architecture (the honest floor) and raw pixels. Features of all of them are extracted once into the
cache and every probe, kNN and sweep reads them from there.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.datasets import load_dataset
from selfsup.errors import ConfigError, SelfsupError
from selfsup.eval.features import Features, data_fingerprint, extract_features, sample_keys
from selfsup.eval.shard import Shard
from selfsup.runs import not_an_encoder_message  # noqa: F401  (re-exported: it lived here first)
from selfsup.ssl.backbone import Backbone
from selfsup.ssl.encoders import ImageEncoder, build_encoder, load_encoder

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
    source: str | None = None
    skip_bad: bool = False  # the run was pretrained with --skip-bad-images: its evaluation skips them too
    cache_dir: Path | None = None  # the feature cache (default: results_dir's parent's features/)
    output_given: bool = False  # results_dir is the user's --output: never moved (see results_dir_for)


def run_skip_bad(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` was pretrained with ``--skip-bad-images`` (its config.yaml's data.skip_bad)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return False
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return False
    data = cfg.get("data") if isinstance(cfg, dict) else None
    return bool(isinstance(data, dict) and data.get("skip_bad"))


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
    """An encoder from a run directory, an export directory, a Lightning ``.ckpt`` of a run, or ``random_init``
    (a backbone name)."""
    if (source is None) == (random_init is None):
        raise ConfigError("give either a run or export directory (or a .ckpt file), or --random-init BACKBONE")
    if random_init is not None:
        twin = _seeded(lambda: ImageEncoder(Backbone(random_init)))
        home = Path("runs") / f"random-{random_init}"
        out = Path(output) if output else home / "eval"
        return EncoderSource(f"random-init {random_init}", twin(), out, None, None, twin,
                             source=f"random-init:{random_init}", cache_dir=out / "features" if output else home / "features",
                             output_given=output is not None)
    path = Path(source)
    if path.is_file() and path.suffix == ".ckpt":
        return _checkpoint_source(path, output)
    export = path / "export" if (path / "export" / "config.json").is_file() else path
    if not (export / "config.json").is_file():
        raise ConfigError(not_an_encoder_message(path))
    encoder = load_encoder(export)
    config = encoder.config
    run_dir = export.parent if export.name == "export" else export
    data_cfg = config.get("data") or {}
    twin = _seeded(lambda: build_encoder(config["method"], config["hparams"]))  # no Lightning
    name = f"{config['method']} ({run_dir.name})"
    results = Path(output) if output else run_dir / "eval"
    return EncoderSource(name, encoder, results, data_cfg.get("data"), data_cfg.get("image_size"), twin, config,
                         str(export.resolve()), skip_bad=bool(data_cfg.get("skip_bad")) or run_skip_bad(run_dir),
                         cache_dir=run_dir / "features", output_given=output is not None)


def _checkpoint_source(path: Path, output: str | None) -> EncoderSource:
    """The encoder of a Lightning ``.ckpt`` of a run; its results go to ``<run>/eval/checkpoint-<name>/``.

    The checkpoint's weights are not the run's exported encoder, so its results never overwrite the
    run's own; data, image size and --skip-bad-images come from the run's config (its export's when
    there is one).
    """
    import yaml

    encoder = load_encoder(path)
    config = encoder.config
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    data_cfg: dict = {}
    for cfg_path in (run_dir / "export" / "config.json", run_dir / "config.yaml"):
        if cfg_path.is_file() and not data_cfg.get("data"):
            try:
                cfg = yaml.safe_load(cfg_path.read_text()) or {}  # JSON is YAML
            except yaml.YAMLError:
                continue
            data_cfg = (cfg.get("data") if isinstance(cfg, dict) else None) or {}
    data_cfg = {**(config.get("data") or {}), **data_cfg}
    twin = _seeded(lambda: build_encoder(config["method"], config["hparams"]))  # no Lightning
    step = config.get("global_step")
    name = f"{config['method']} ({run_dir.name}, {path.name}{f', step {step}' if step is not None else ''})"
    results = Path(output) if output else run_dir / "eval" / f"checkpoint-{path.stem}"
    return EncoderSource(name, encoder, results, data_cfg.get("data"), data_cfg.get("image_size"), twin, config,
                         str(path.resolve()), skip_bad=bool(data_cfg.get("skip_bad")) or run_skip_bad(run_dir),
                         cache_dir=run_dir / "features", output_given=output is not None)


def same_data(a: str | None, b: str | None) -> bool:
    """Whether two data specs name the same data (``imgs`` and ``/abs/imgs``, ``folder:X`` and ``X``)."""
    if a is None or b is None:
        return False
    from selfsup.data.datasets import parse_spec

    try:
        return parse_spec(a) == parse_spec(b)
    except SelfsupError:  # e.g. "cifar10:" without a root
        return a == b


def data_label(spec: str, image_size: int) -> str:
    """A folder name for results on other data: ``<data-name>-<size>px-<hash>``, e.g. ``cifar10-32px-1a2b3c``.

    The name is the data's kind (``digits``, ``cifar10``) or a folder's own name; the short hash of its
    resolved location and the size tells two folders of the same name apart.
    """
    import hashlib
    import re

    from selfsup.data.datasets import parse_spec

    kind, root = parse_spec(spec)
    name = root.name if kind in ("folder", "wds") and root is not None else kind
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or kind
    digest = hashlib.sha256(f"{kind}:{root}:{image_size}".encode()).hexdigest()[:6]
    return f"{name}-{image_size}px-{digest}"


def results_dir_for(src: EncoderSource, ev: EvalData) -> Path:
    """Where results of ``src`` on ``ev`` go: ``--output`` when given; the run's ``eval/`` for the data and
    image size it was trained on; else ``eval/<data-name>-<size>px-<hash>/`` (:func:`data_label`), so an
    evaluation on other data or another size never overwrites the run's own results."""
    if src.output_given:
        return src.results_dir
    size = int(ev.train.image_size)
    own = same_data(ev.spec, src.data) and (src.image_size is None or int(src.image_size) == size)
    return src.results_dir if own else src.results_dir / data_label(ev.spec, size)


@dataclass
class EvalData:
    """Train and test splits of a dataset, and the features of every encoder on them."""

    spec: str
    train: object
    test: object
    features: dict[str, tuple[Features, Features]]
    keys: list[str] | None = None  # each training image's path relative to the data root (None: no files)
    skip_bad: bool = False  # corrupt or non-image files were skipped
    layers: dict[str, dict[str, tuple[Features, Features]]] | None = None  # --layers: encoder -> layer -> pair

    def targets(self) -> dict[str, dict[str, tuple[Features, Features]]]:
        """encoder -> layer -> features: the layers read (``--layers``), else each encoder's ``"out"``."""
        if self.layers is not None:
            return self.layers
        return {name: {"out": pair} for name, pair in self.features.items()}

    @property
    def dataset_key(self) -> str:
        """The data's name without its location ("folder", "cifar10", "digits"): seeds the subsets."""
        return str(getattr(self.train, "name", self.spec)).split(":", 1)[0]


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
    skip_bad: bool | None = None,
    crop_pct: float | None = None,
    layers: str | list[str] | None = None,
) -> EvalData:
    """Load the dataset's train and test splits and extract (or read cached) features of the encoder and baselines.

    ``skip_bad`` skips (and counts, with one warning) corrupt or non-image files instead of stopping;
    None: as the run was pretrained (``--skip-bad-images``), else off. ``crop_pct``: the centre crop of
    large (streamed) images; None: the run's (its export's ``data.crop_pct``), else 0.875.
    ``layers`` (see :mod:`selfsup.eval.layers`) reads those layers of the encoder and of its random-init
    twin (the floor at the same layers) in one pass each; raw pixels have one layer, ``"out"``.
    """
    spec = data or src.data or "digits"
    size = image_size or (src.image_size if same_data(spec, src.data) else None)
    skip = src.skip_bad if skip_bad is None else skip_bad
    if crop_pct is None:
        crop_pct = ((src.meta or {}).get("data") or {}).get("crop_pct")
    train = load_dataset(spec, "train", image_size=size, skip_bad=skip, crop_pct=crop_pct)
    test = load_dataset(spec, "val", image_size=train.image_size, skip_bad=skip, crop_pct=crop_pct)
    encoders = {src.name: src.encoder}
    if baselines:
        if not src.name.startswith("random"):
            encoders["random init (same architecture)"] = src.random_twin()
        encoders["pixels"] = PixelEncoder(train.image_size)
    cache = Path(cache_dir) if cache_dir else (src.cache_dir or src.results_dir.parent / "features")
    feats, by_layer = {}, {}
    for name, enc in encoders.items():
        kw = dict(batch_size=batch_size, cache_dir=cache, dtype=dtype, progress=progress, **(trainer_kwargs or {}))
        if layers is not None and not isinstance(enc, PixelEncoder):
            tr = extract_features(enc, train, "train", name=name, layers=layers, **kw)
            te = extract_features(enc, test, "val", name=name, layers=layers, **kw)
            by_layer[name] = {layer: (tr[layer], te[layer]) for layer in tr}
            feats[name] = by_layer[name].get("out") or next(iter(by_layer[name].values()))
        else:
            feats[name] = (extract_features(enc, train, "train", name=name, **kw),
                           extract_features(enc, test, "val", name=name, **kw))
            by_layer[name] = {"out": feats[name]}
    return EvalData(spec, train, test, feats, sample_keys(train), skip, by_layer if layers is not None else None)


def arrays(pair: tuple[Features, Features]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train, test = pair
    return train.x, train.y, test.x, test.y




def _table(title: str, rows: dict[str, dict], columns: dict[str, str]):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    table.add_column("encoder")
    for label in columns.values():
        table.add_column(label, justify="right")
    for name, row in rows.items():
        table.add_row(escape(name), *("-" if row.get(key) is None else f"{row[key]:.1f}" if isinstance(row[key], float)
                              else str(row[key]) for key in columns))
    return table


def evaluate(
    ev: EvalData, kind: str, k: int = 20, temperature: float | None = None, device: str | None = None,
    shard: Shard | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Linear probe (``kind="probe"``) or kNN (``kind="knn"``) of every encoder on all training labels;
    ``progress`` shows each probe's L2-strength search. With 5 classes or fewer ``top5`` is None (it
    would be 100 by construction).

    With a ``shard`` (every rank of a distributed job calls this) each probe is data-parallel: see
    :func:`~selfsup.eval.linear.linear_probe`; every rank returns the same rows. kNN ignores it.
    """
    from selfsup.eval.knn import knn_classify
    from selfsup.eval.linear import linear_probe

    rows = {}
    for name, per_layer in ev.targets().items():
        layer_rows = {}
        for layer, pair in per_layer.items():
            what = name if ev.layers is None else f"{name} [{layer}]"
            if kind == "probe":
                res = linear_probe(*arrays(pair), device=device, shard=shard, progress=what if progress else False)
                row = {key: res[key] for key in ("top1", "top5", "weight_decay", "C", "val_top1", "val_curve", "fit",
                                                  "settings", "n_train", "n_val", "n_test", "device", "world_size",
                                                  "seconds")}
            else:
                res = knn_classify(*arrays(pair), k=k, temperature=temperature, device=device)
                row = {key: res[key] for key in ("top1", "top5", "k", "temperature", "backend", "n_train", "n_test",
                                                  "device", "seconds")}
                if ev.layers is not None and len(per_layer) > 1:
                    row["val_top1"] = knn_holdout_top1(pair, k, temperature, device)
            if len(ev.train.classes) <= 5:  # top-5 of 5 classes or fewer is 100 by construction: left out
                row["top5"] = None
            layer_rows[layer] = {**row, "features": int(pair[0].x.shape[1]), **feature_provenance(pair)}
        if ev.layers is None:
            rows[name] = layer_rows["out"]
            continue
        best = best_layer(layer_rows)
        rows[name] = {**layer_rows[best], "layer": best, "best_layer": best,
                      "layers": {layer: {key: r.get(key) for key in LAYER_KEYS if key in r}
                                 for layer, r in layer_rows.items()}}
    return rows


LAYER_KEYS = ("top1", "top5", "weight_decay", "val_top1", "features", "pooling", "feature_cache", "k", "seconds")
"""What the results JSON keeps of each layer's probe or kNN under ``layers``."""


def best_layer(layer_rows: dict[str, dict]) -> str:
    """The layer with the best held-out *training* accuracy (``val_top1``; never the test split), first on ties."""
    vals = {layer: r.get("val_top1") for layer, r in layer_rows.items()}
    if any(v is None or v != v for v in vals.values()):  # no hold-out possible (a class with 1 label)
        return "out" if "out" in vals else list(vals)[-1]
    return max(vals, key=lambda layer: vals[layer])  # max keeps the first (shallowest) of equal ones


def knn_holdout_top1(pair: tuple[Features, Features], k: int, temperature: float | None, device) -> float:
    """kNN top-1 on the probe's held-out 20% of the training labels (seed 0), the rest as neighbours:
    how the best layer of a kNN evaluation is chosen without looking at the test split."""
    from selfsup.eval.knn import knn_classify
    from selfsup.eval.linear import stratified_holdout

    train = pair[0]
    y = torch.as_tensor(np.asarray(train.y))
    parts = stratified_holdout(torch.unique(y, return_inverse=True)[1], 0.2, 0)
    if parts is None:
        return float("nan")
    fit, val = (p.numpy() for p in parts)
    held = np.asarray(train.x[val])  # a copy of the held-out rows only
    return knn_classify(train.x, train.y, held, train.y[val], k=min(k, len(fit)), temperature=temperature,
                        device=device, train_rows=torch.from_numpy(fit), check_finite=False)["top1"]


def feature_provenance(pair: tuple[Features, Features]) -> dict[str, Any]:
    """Where an encoder's features came from: its weights' hash, dtype and cache file."""
    train = pair[0]
    out = {"encoder_hash": train.meta.get("encoder"), "feature_dtype": str(train.x.dtype),
           "feature_cache": train.path.name}
    if train.meta.get("layer"):
        out.update(layer=train.meta["layer"], pooling=train.meta.get("pooling"))
    return out


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def provenance(ev: EvalData, src: EncoderSource, started: float, device: str | None = None,
               world_size: int = 1, settings: dict | None = None) -> dict[str, Any]:
    """What a result JSON needs to be reproduced and compared: encoder, data, features, software, hardware."""
    import selfsup

    train, test = next(iter(ev.features.values()))
    meta = train.meta
    dev = device or "cpu"
    return {
        "encoder": {"name": src.name, "method": src.meta.get("method", "random-init"), "source": src.source,
                    "hash": meta.get("encoder"), "config": {k: v for k, v in src.meta.items() if k != "hparams"}},
        "data": {"spec": ev.spec, "name": ev.dataset_key, "fingerprint": data_fingerprint(ev.train, ev.keys),
                 "n_train": len(ev.train), "n_test": len(ev.test), "num_classes": len(ev.train.classes),
                 "image_size": meta.get("image_size"), "transform": meta.get("transform"),
                 "subsets_keyed_by": "relative image paths" if ev.keys is not None else "dataset name and row order",
                 "skip_bad_images": ev.skip_bad},
        "features": {"dtype": meta.get("dtype"), "dim": int(train.x.shape[1]),
                     **({"layers": {layer: {"dim": int(p[0].x.shape[1]),
                                            "pooling": p[0].meta.get("pooling") or "the encoder's own output"}
                                    for layer, p in next(iter(ev.layers.values())).items()},
                         "pooling_protocol": "each stage map average-pooled to about 9,000 dims "
                                             "(Goyal et al. 2019, https://arxiv.org/abs/1905.01235)"}
                        if ev.layers is not None else {})},
        "settings": settings or {},
        "software": {"selfsup": selfsup.__version__, "torch": torch.__version__, "faiss": _version("faiss"),
                     "numpy": np.__version__, "python": platform.python_version()},
        "hardware": {"device": dev, "device_name": torch.cuda.get_device_name(torch.device(dev))
                     if dev.startswith("cuda") else platform.processor() or platform.machine(),
                     "world_size": world_size, "torch_threads": torch.get_num_threads()},
        "command": ["selfsup", *sys.argv[1:]],
        "wall_seconds": time.perf_counter() - started,
    }


def probe_settings() -> dict[str, Any]:
    """The linear probe's defaults, as the CLI runs it (each run also records its solver, iterations, convergence)."""
    import inspect

    from selfsup.eval.linear import DEFAULT_WEIGHT_DECAYS, linear_probe

    params = inspect.signature(linear_probe).parameters
    names = ("val_fraction", "max_iter", "patience", "tol", "min_iter", "batch_size", "default_weight_decay")
    return {"weight_decays": list(DEFAULT_WEIGHT_DECAYS), **{n: params[n].default for n in names},
            "path_tol": "10 * tol", "tol_rule": "max|grad| <= tol * max|grad at W=0|",
            "solver": "lbfgs (strong Wolfe), warm-started from the strongest penalty"}


def saved_results(path: Path, ev: EvalData, kind: str, settings: dict) -> dict[str, dict] | None:
    """The rows of a result JSON (``probe.json``, ``knn_k20.json``, ``probe_layers.json``) when its provenance
    matches what would be computed now, else None: the same data (fingerprint), the same settings, the same
    encoders and layers, and every one's feature cache file the same (its name hashes the encoder's weights,
    the data, image size, transform, dtype and pooling), so the fits would repeat exactly."""
    import json

    try:
        saved = json.loads(path.read_text())
        prov = saved["provenance"]
        rows = saved["results"]
        if saved.get("kind") != kind or prov.get("settings") != json.loads(json.dumps(settings)):
            return None
        if prov["data"]["fingerprint"] != data_fingerprint(ev.train, ev.keys):
            return None
        targets = ev.targets()
        if set(rows) != set(targets):
            return None
        for name, per_layer in targets.items():
            found = (rows[name].get("layers") or {}) if ev.layers is not None else {"out": rows[name]}
            if list(found) != list(per_layer):
                return None
            if any(found[layer].get("feature_cache") != pair[0].path.name for layer, pair in per_layer.items()):
                return None
        return rows
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def result_name(kind: str, k: int = 20, temperature: float | None = None, layers: str | None = None) -> str:
    """The JSON file of a result: ``probe.json``, or ``knn_k20.json`` / ``knn_k200_t0.07.json`` (a kNN
    with other settings never overwrites another's); a layer-wise one ends ``_layers`` (``probe_layers.json``),
    a sweep on the best layer ``_best-layer``."""
    tail = "" if layers is None else "_best-layer" if layers.strip() == "best" else "_layers"
    if kind != "knn":
        return f"{kind}{tail}.json"
    return f"knn_k{k}" + ("" if temperature is None else f"_t{temperature:g}") + tail + ".json"


def report(ev: EvalData, kind: str, rows: dict[str, dict], results_dir: Path, extra: dict | None = None,
           name: str | None = None) -> Path:
    """Print a rich table of ``rows`` and write them as JSON under ``results_dir``."""
    from selfsup.eval.report import make_console, write_json

    title = f"{kind} on {ev.spec}: {len(ev.train)} train / {len(ev.test)} test images"
    columns = {"top1": "top-1 %", "top5": "top-5 %", "features": "dim"}
    if len(ev.train.classes) <= 5:  # top-5 of 5 classes or fewer is 100 by construction
        columns.pop("top5")
    if ev.layers is not None:
        shown = {}
        for encoder, row in rows.items():
            for layer, r in row["layers"].items():
                mark = " *" if layer == row["best_layer"] else ""
                shown[f"{encoder} [{layer}]{mark}"] = r
        columns = {**columns, "val_top1": "held-out top-1 %"}
        title += " (* best layer on held-out training labels)"
        make_console().print(_table(title, shown, columns))
    else:
        make_console().print(_table(title, rows, columns))
    return write_json({"kind": kind, "data": ev.spec, **(extra or {}), "results": rows},
                      results_dir / (name or f"{kind}.json"))


def sweep_pairs(ev: EvalData) -> dict[str, tuple[Features, Features]]:
    """The sweep's lines: each encoder's features, or with ``--layers`` each ``name [layer]`` (a single
    layer keeps the encoder's name, as ``--layers best`` leaves it)."""
    if ev.layers is None:
        return dict(ev.features)
    out = {}
    for name, per_layer in ev.layers.items():
        for layer, pair in per_layer.items():
            out[name if len(per_layer) == 1 else f"{name} [{layer}]"] = pair
    return out


def keep_best_layers(ev: EvalData, rows: dict[str, dict]) -> dict[str, dict]:
    """Keep only each encoder's best layer (``rows`` of a layer-wise probe, chosen on held-out training
    labels) in ``ev``; returns what was chosen: ``{encoder: {"layer", "val_top1"}}``."""
    chosen = {}
    for name, row in rows.items():
        layer = row["best_layer"]
        ev.layers[name] = {layer: ev.layers[name][layer]}
        ev.features[name] = ev.layers[name][layer]
        chosen[name] = {"layer": layer, "val_top1": row["layers"][layer].get("val_top1"),
                        "chosen_by": "full-label linear probe, held-out 20% of the training labels (seed 0)"}
    return chosen


SUPERVISED = "supervised (same backbone, from scratch)"


def name_classes(result: dict, classes: list[str]) -> None:
    """Put the class names into a sweep result's ``classes_under_k`` (the sweep records class labels)."""

    def name(label) -> str:
        i = int(label)
        return str(classes[i]) if 0 <= i < len(classes) else str(label)

    for budget in result["budgets"]:
        for entry in budget.get("classes_under_k", ()):
            entry["name"] = name(entry["class"])
    result["classes_under_k"] = {b: {name(label): n for label, n in under.items()}
                                 for b, under in result.get("classes_under_k", {}).items()}


def classes_under_k_note(result: dict, shown: int = 10) -> str | None:
    """The lines saying which classes have fewer training images than a k budget (they give all they have)."""
    lines = []
    for budget, under in result.get("classes_under_k", {}).items():
        k = budget.removeprefix("k=")
        items = [f"{name} ({n})" for name, n in under.items()]
        more = f", ... and {len(items) - shown} more (see classes_under_k in sweep.json)" if len(items) > shown else ""
        have = "1 class has" if len(items) == 1 else f"{len(items)} classes have"
        lines.append(f"note: {budget}: {have} fewer than {k} training images, so that budget uses all of them: "
                     f"{', '.join(items[:shown])}{more}")
    return "\n".join(lines) or None


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
    subset_files=(),
    device: str | None = None,
    shard: tuple[int, int] | None = None,
    gather: Callable[[dict], dict] | None = None,
    started: float | None = None,
    best_layers: dict[str, dict] | None = None,
    name: str = "sweep",
) -> tuple[Path, Path] | None:
    """Label-efficiency sweep of every encoder's cached features; JSON, table and PNG under :func:`results_dir_for`.

    ``finetune`` adds end-to-end fine-tuning of the encoder on each subset (method ``finetune``);
    ``supervised`` adds the same backbone trained from scratch on each subset, as its own line. With
    ``shard=(rank, world)`` and ``gather`` the probes are spread over the ranks; only rank 0 writes
    (and returns the paths; other ranks return None). With layer-wise features (``ev.layers``) each
    encoder's layers are swept as lines of their own, ``name [layer]``; ``best_layers`` (from
    :func:`keep_best_layers`) is recorded.
    """
    from selfsup.eval.label_efficiency import label_efficiency_sweep
    from selfsup.eval.report import make_console, plot_sweep, print_sweep_table, write_json

    started = time.perf_counter() if started is None else started
    pairs = sweep_pairs(ev)
    encoders = {name: arrays(pair) for name, pair in pairs.items()}
    rank = 0 if shard is None else shard[0]
    common = dict(ks=ks, percents=percents, seeds=seeds, dataset_key=ev.dataset_key, progress=progress and rank == 0,
                  keys=ev.keys, subset_files=subset_files, device=device)
    result = label_efficiency_sweep(encoders, methods=methods, shard=shard, gather=gather, **common)
    if rank != 0:
        return None
    num_classes = len(ev.train.classes)
    name_classes(result, list(ev.train.classes))

    def trainer_for(build: Callable[[], nn.Module], lr_scale: float):
        from selfsup.eval.finetune import train_classifier  # Lightning: imported only to fine-tune or train

        def run(name: str, subset: np.ndarray, seed: int) -> dict:
            what = "train from scratch" if lr_scale == 1.0 else "fine-tune"
            return train_classifier(build(), ev.train, ev.test, subset, num_classes, steps=finetune_steps,
                                    encoder_lr_scale=lr_scale, seed=seed,
                                    progress=f"{what} {name}: {len(subset)} labels, seed {seed}" if progress else False)

        return run

    extra = []
    if finetune:
        extra.append((src.name, trainer_for(lambda: src.encoder, 0.1)))
    if supervised:
        extra.append((SUPERVISED, trainer_for(src.random_twin, 1.0)))
    for who, fn in extra:  # not `name`: that is the result files' name
        res = label_efficiency_sweep({who: encoders[next(iter(encoders))]}, methods=["finetune"], finetune_fn=fn,
                                     **common)
        result["results"].setdefault(who, {}).update(res["results"][who])
        if "finetune" not in result["methods"]:
            result["methods"].append("finetune")
    result["features"] = {name: feature_provenance(pair) for name, pair in pairs.items()}
    if ev.layers is not None:
        result["layers"] = {name: list(per_layer) for name, per_layer in ev.layers.items()}
        if best_layers:
            result["best_layers"] = best_layers
    settings = {"ks": list(ks), "percents": list(percents), "seeds": list(seeds), "methods": list(methods),
                "subset_files": [str(f) for f in subset_files], "knn_k": 20, "knn_temperature": None,
                "linear_probe": probe_settings()}
    result["provenance"] = provenance(ev, src, started, device, 1 if shard is None else shard[1], settings)
    print_sweep_table(result, make_console())
    out = results_dir_for(src, ev)
    return write_json(result, out / f"{name}.json"), plot_sweep(result, out / f"{name}.png")
