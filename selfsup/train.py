"""The pretraining driver behind ``selfsup pretrain``: one run directory per run, resumable.

A run is described by a nested config (the same dict is written to ``runs/<name>/config.yaml``, and
``selfsup pretrain --config runs/<name>/config.yaml`` reruns it)::

    method: rotation
    model: {backbone: cifar_resnet18, lr: 0.1, ...}      # the method's constructor arguments
    data: {data: digits, batch_size: 256, ...}           # SelfSupDataModule's arguments
    trainer: {max_epochs: 100, devices: auto, ...}       # Lightning Trainer settings
    seed: 0
    output: runs
    name: rotation-cifar_resnet18
    online_probe: true
    tensorboard: false
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from selfsup.data.datamodule import SelfSupDataModule
from selfsup.errors import ConfigError
from selfsup.eval.online import OnlineLinearProbe
from selfsup.ssl.module import METHODS, SSLModule, build_method
from selfsup.ssl.module import method_arguments as class_arguments

TRAINER_DEFAULTS: dict = {
    "max_epochs": 100,
    "max_steps": -1,
    "max_time": None,
    "accelerator": "auto",
    "devices": "auto",
    "num_nodes": 1,
    "strategy": "auto",
    "precision": "32-true",
    "accumulate_grad_batches": 1,
    "log_every_n_steps": 10,
    "check_val_every_n_epoch": 1,
    "fast_dev_run": 0,
}
DATA_DEFAULTS: dict = {
    "data": "digits",
    "batch_size": 256,
    "num_workers": None,
    "image_size": None,
    "cache_dir": None,
    "skip_bad": False,
}


def method_arguments(method: str) -> dict[str, inspect.Parameter]:
    """Every constructor argument of a registered method's class chain, by name, with its defaults."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    return class_arguments(METHODS[method])


def default_config(method: str = "rotation") -> dict:
    """A complete config with every default filled in."""
    return {
        "method": method,
        "model": {k: p.default for k, p in method_arguments(method).items()},
        "data": dict(DATA_DEFAULTS),
        "trainer": dict(TRAINER_DEFAULTS),
        "seed": 0,
        "output": "runs",
        "name": None,
        "online_probe": True,
        "tensorboard": False,
    }


def merge_config(base: dict, override: dict, where: str = "config") -> dict:
    """``base`` updated by ``override`` (nested); an unknown key is an error, never silently ignored."""
    out = dict(base)
    for k, v in override.items():
        if k not in base:
            raise ConfigError(f"unknown {where} key {k!r}; known: {', '.join(sorted(base))}")
        out[k] = merge_config(base[k], v, f"{where}.{k}") if isinstance(base[k], dict) and isinstance(v, dict) else v
    return out


def load_config(path: str | Path) -> dict:
    """Read a run's ``config.yaml`` (one written by a previous run, or by hand)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg


@dataclass
class RunResult:
    """What a finished pretraining run left behind."""

    run_dir: Path
    model: SSLModule
    datamodule: SelfSupDataModule
    metrics: dict
    probe: OnlineLinearProbe | None


RUN_DIR_ENV = "SELFSUP_RUN_DIR"


def is_launcher_rank_zero() -> bool:
    """Whether this process is global rank 0 of a (possibly not yet started) distributed run.

    Reads the variables torchrun, SLURM and Lightning's own launcher set; a plain process is rank 0.
    """
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var) is not None:
            return int(os.environ[var]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def resolve_run_dir(cfg: dict, resume: bool) -> Path:
    """``output/name``; a default name gets a numeric suffix instead of overwriting an earlier run."""
    output = Path(cfg["output"])
    name = cfg["name"]
    if resume:
        if not name:
            raise ConfigError("--resume needs the --name of the run to continue")
        run_dir = output / name
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise ConfigError(f"cannot resume: {run_dir}/checkpoints/last.ckpt not found")
        return run_dir
    if name:
        run_dir = output / name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir} already exists: pass --resume to continue it, or another --name")
        return run_dir
    base = f"{cfg['method']}-{cfg['model'].get('backbone', 'model')}"
    run_dir, i = output / base, 1
    while run_dir.exists():
        run_dir, i = output / f"{base}-{i}", i + 1
    return run_dir


def _set_aside_metrics(run_dir: Path) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv; keep it as a numbered part instead."""
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        i = 0
        while (run_dir / f"metrics.part{i}.csv").exists():
            i += 1
        metrics.rename(run_dir / f"metrics.part{i}.csv")


def _merge_metrics(run_dir: Path) -> None:
    """Join the parts set aside on resume and the new metrics.csv into one metrics.csv."""
    parts = sorted(run_dir.glob("metrics.part*.csv"), key=lambda p: int(p.stem.removeprefix("metrics.part")))
    if not parts:
        return
    rows: list[dict] = []
    for p in [*parts, run_dir / "metrics.csv"]:
        if p.is_file():
            with p.open(newline="") as f:
                rows.extend(csv.DictReader(f))
    keys = sorted({k for r in rows for k in r})
    tmp = run_dir / "metrics.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, run_dir / "metrics.csv")
    for p in parts:
        p.unlink()


def pretrain(config: dict | None = None, resume: bool = False, callbacks: list | None = None) -> RunResult:
    """Pretrain a method as described by ``config`` (see the module docstring); returns the run.

    Writes ``config.yaml``, Lightning checkpoints (``checkpoints/last.ckpt``), ``metrics.csv``,
    ``metrics.json`` and ``export/`` (``encoder.safetensors`` + ``config.json``) under the run dir.
    """
    cfg = merge_config(default_config((config or {}).get("method", "rotation")), config or {})
    launcher_zero = is_launcher_rank_zero()
    if launcher_zero:
        run_dir = resolve_run_dir(cfg, resume=resume)
        # Lightning's DDP launcher re-runs this command for the other ranks: they must use this directory.
        os.environ[RUN_DIR_ENV] = str(run_dir)
    elif os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
    elif cfg["name"]:
        run_dir = Path(cfg["output"]) / cfg["name"]
    else:
        raise ConfigError("a run started by torchrun or SLURM needs --name, so that every rank uses one directory")
    if resume:
        saved = load_config(run_dir / "config.yaml")
        # The run's own config wins, except for how long to train and where it runs.
        cfg = merge_config(saved, {"trainer": {**saved["trainer"], **_changed(cfg["trainer"], TRAINER_DEFAULTS)}})
    cfg["name"] = run_dir.name

    pl.seed_everything(cfg["seed"], workers=True, verbose=False)
    dm = SelfSupDataModule(**cfg["data"])
    dm.setup("fit")
    if "image_size" in method_arguments(cfg["method"]) and "image_size" not in (config or {}).get("model", {}):
        cfg["model"]["image_size"] = dm.image_size  # methods that cut images (CPC's grid) follow the data
    model = build_method(cfg["method"], cfg["model"])

    run_dir.mkdir(parents=True, exist_ok=True)
    if launcher_zero:
        if not resume:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        _set_aside_metrics(run_dir)

    probe = OnlineLinearProbe(dm.num_classes) if cfg["online_probe"] and dm.num_classes >= 2 else None
    # Methods with a held-out metric of their own (a flow's val/bits_per_dim) validate without the probe too.
    validates = probe is not None or type(model).validation_step is not SSLModule.validation_step
    cbs = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_epochs=1),
        LearningRateMonitor(logging_interval="step"),
        *([probe] if probe else []),
        *(callbacks or []),
    ]
    loggers = [CSVLogger(save_dir=str(run_dir.parent), name=run_dir.name, version="")]
    if cfg["tensorboard"]:
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    trainer = pl.Trainer(
        **cfg["trainer"],
        default_root_dir=str(run_dir),
        callbacks=cbs,
        logger=loggers,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if validates and dm.val_set is not None else 0,
    )
    ckpt = str(run_dir / "checkpoints" / "last.ckpt") if resume else None
    try:
        with warnings.catch_warnings():
            # metrics.csv was set aside above and is merged back below: nothing is deleted.
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    finally:
        if trainer.is_global_zero:
            _merge_metrics(run_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        model.export(run_dir / "export", data={"data": cfg["data"]["data"], "image_size": dm.image_size})
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return RunResult(run_dir, model, dm, metrics, probe)


def _changed(values: dict, defaults: dict) -> dict:
    return {k: v for k, v in values.items() if defaults.get(k) != v}
