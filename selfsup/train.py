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
    verbose: false                                       # Lightning's start-up chatter and model summary
    checkpoint_every: null                               # also checkpoint every N steps
    keep_checkpoints: 2                                  # numbered checkpoints kept besides last.ckpt (0: all)
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from selfsup.checkpoint import (
    AtomicCheckpointIO,
    atomic_write_text,
    clean_stale_temp_files,
    find_resumable_checkpoint,
)
from selfsup.config import (  # noqa: F401  (re-exported: the config API lived here first)
    DATA_DEFAULTS,
    TRAINER_DEFAULTS,
    check_ranges,
    default_config,
    load_config,
    merge_config,
    unknown_name_message,
    validate_config,
)
from selfsup.data.datamodule import SelfSupDataModule
from selfsup.divergence import DivergenceGuard
from selfsup.errors import ConfigError, TrainingError, TrainingInterrupted, TrainingStopped
from selfsup.eval.online import OnlineLinearProbe
from selfsup.progress import lightning_bar
from selfsup.quiet import quiet_lightning
from selfsup.resume import (
    ExactResume,
    FreshTimer,
    KeepCheckpoints,
    SaveOnSigterm,
    SecondInterrupt,
    StartupInterrupted,
)
from selfsup.runs import (
    claim_run_dir,
    is_launcher_rank_zero,  # noqa: F401  (re-exported: it lived here first)
    merge_metrics,
    set_aside_metrics,
)
from selfsup.ssl.module import METHODS, SSLModule, build_method
from selfsup.ssl.module import method_arguments as class_arguments
from selfsup.startup import Terminated


def method_arguments(method: str) -> dict[str, inspect.Parameter]:
    """Every constructor argument of a registered method's class chain, by name, with its defaults."""
    if method not in METHODS:
        raise ConfigError(unknown_name_message("method", method, METHODS))
    return class_arguments(METHODS[method])


@dataclass
class RunResult:
    """What a finished pretraining run left behind."""

    run_dir: Path
    model: SSLModule
    datamodule: SelfSupDataModule
    metrics: dict
    probe: OnlineLinearProbe | None
    stopped_by_time: str | None = None
    """The ``max_time`` limit (``DD:HH:MM:SS``) when it ended the run before its step and epoch limits
    (``--resume`` continues it), else None."""
    global_step: int = 0
    resume_command: str = ""


RUN_DIR_ENV = "SELFSUP_RUN_DIR"


def resolve_config(config: dict | None, resume: bool = False) -> dict:
    """The complete, validated config of a run: defaults, the user's values, and (on resume) the run's own.

    On ``resume`` the run's ``config.yaml`` wins, except for the trainer settings and
    ``checkpoint_every`` and ``keep_checkpoints`` the caller gives (how long to train and where).

    Raises:
        ConfigError: an unknown key or method, a value of the wrong type; one line naming it.
    """
    given = dict(config or {})
    method = given.get("method", "rotation")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(unknown_name_message("method", method, METHODS))
    cfg = validate_config(merge_config(default_config(method), given))
    if not resume:
        return cfg
    if not cfg["name"]:
        raise ConfigError("--resume needs the --name of the run to continue")
    path = Path(cfg["output"]) / cfg["name"] / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} not found (is --name or --output wrong?)")
    saved = load_config(path)
    saved_method = saved.get("method")
    if saved_method is None:
        raise ConfigError(f"{path} has no 'method' entry: it is not the config.yaml of a selfsup run")
    if not isinstance(saved_method, str) or saved_method not in METHODS:
        raise ConfigError(f"{path}: " + unknown_name_message("method", saved_method, METHODS))
    run = validate_config(merge_config(default_config(saved_method), saved, str(path)), source=str(path))
    given_trainer = given.get("trainer") or {}
    run["trainer"].update({k: cfg["trainer"][k] for k in given_trainer})
    for key in ("checkpoint_every", "keep_checkpoints"):
        if key in given:
            run[key] = cfg[key]
    run["output"], run["name"] = cfg["output"], cfg["name"]
    check_ranges(run)  # the run's own settings with the new limits: still a run that ends
    return run


def pretrain(config: dict | None = None, resume: bool = False, callbacks: list | None = None) -> RunResult:
    """Pretrain a method as described by ``config`` (see the module docstring); returns the run.

    Writes ``config.yaml``, Lightning checkpoints (``checkpoints/last.ckpt``), ``metrics.csv``,
    ``metrics.json`` and ``export/`` (``encoder.safetensors`` + ``config.json``) under the run dir.
    The whole config is validated, the data loaded and the model built before the run directory is
    claimed (atomically: a second run with the same name gets a clear error), so a bad option never
    leaves a directory or a ``config.yaml`` behind. Every file is written atomically; ``resume``
    continues from the newest checkpoint that loads, exactly where it stopped.

    Raises:
        ConfigError, DataError, RunDirError, CheckpointError, TrainingError: one line each.
    """
    cfg = resolve_config(config, resume)
    launcher_zero = is_launcher_rank_zero()
    if not launcher_zero and not os.environ.get(RUN_DIR_ENV) and not cfg["name"]:
        raise ConfigError("a run started by torchrun or SLURM needs --name, so that every rank uses one directory")

    claimed: list[Path] = []
    try:
        pl.seed_everything(cfg["seed"], workers=True, verbose=False)
        dm = SelfSupDataModule(**cfg["data"], seed=cfg["seed"])
        dm.setup("fit")
        if "image_size" in method_arguments(cfg["method"]) and "image_size" not in (config or {}).get("model", {}):
            cfg["model"]["image_size"] = dm.image_size  # methods that cut images (CPC's grid) follow the data
        model = build_method(cfg["method"], cfg["model"])

        if launcher_zero:
            base = f"{cfg['method']}-{cfg['model'].get('backbone', 'model')}"
            claim = claim_run_dir(cfg["output"], cfg["name"], base, resume)
        else:  # Lightning's DDP launcher re-runs this command for the other ranks: rank 0 chose the directory.
            claim = contextlib.nullcontext(Path(os.environ.get(RUN_DIR_ENV) or Path(cfg["output"]) / cfg["name"]))
        with claim as run_dir:
            claimed.append(run_dir)
            previous = os.environ.get(RUN_DIR_ENV)
            os.environ[RUN_DIR_ENV] = str(run_dir)  # for the ranks Lightning's launcher starts during the fit
            cfg["name"] = run_dir.name
            try:
                return _fit(cfg, run_dir, dm, model, resume, callbacks or [], launcher_zero)
            finally:  # not for the next run of this process, nor the processes it starts (torchrun ranks)
                if previous is None:
                    os.environ.pop(RUN_DIR_ENV, None)
                else:
                    os.environ[RUN_DIR_ENV] = previous
    except (KeyboardInterrupt, Terminated) as err:  # outside the training loop, which has its own handling
        raise _stopped_outside_training(err, cfg, claimed[0] if claimed else None, resume) from None


def _stopped_outside_training(err: BaseException, cfg: dict, run_dir: Path | None, resume: bool) -> TrainingStopped:
    """The one line for Ctrl-C (``KeyboardInterrupt``) or SIGTERM (:class:`~selfsup.startup.Terminated`) that
    arrived while no training loop ran (the data set up, the run folder claimed, the export written)."""
    what, error = ("interrupted by Ctrl-C", TrainingInterrupted) if isinstance(err, KeyboardInterrupt) else \
        ("stopped by SIGTERM", TrainingStopped)
    if run_dir is None:
        return error(f"{what} before training started (no run folder was made); rerun the command to start again")
    if not any(run_dir.glob("checkpoints/*.ckpt")):  # claim_run_dir removed (or emptied) a run with no checkpoint
        return error(f"{what} before the first step (nothing to resume, nothing kept in {run_dir}); rerun the "
                     "command to start again")
    return error(f"{what} ({run_dir} is kept; continue or finish it with: {resume_command(cfg, run_dir)})")


def resume_command(cfg: dict, run_dir: Path) -> str:
    """The command line that continues the run in ``run_dir`` (its saved config.yaml holds the rest)."""
    output = "" if Path(cfg["output"]) == Path("runs") else f" --output {shlex.quote(str(cfg['output']))}"
    return f"selfsup pretrain --resume --name {shlex.quote(run_dir.name)}{output}"


def log_interval(requested: int, n_train: int, global_batch: int, accumulate: int = 1) -> int:
    """The logging interval in optimiser steps: ``requested``, but at most one epoch's steps.

    Args:
        requested: the configured ``log_every_n_steps`` (0 turns logging off and stays 0).
        n_train: training images.
        global_batch: images per step over all ranks (per-device batch x world size).
        accumulate: batches accumulated per optimiser step.

    Returns:
        ``min(requested, steps per epoch)``, at least 1 unless ``requested`` is 0.
    """
    if requested <= 0:
        return requested
    steps = max(1, n_train // global_batch) // max(1, accumulate)
    return max(1, min(requested, steps))


def final_validation_batch(max_steps: int, n_train: int, global_batch: int, accumulate: int = 1,
                           steps_per_batch: int = 1) -> int | None:
    """The training batch after which to validate when ``max_steps`` ends the run inside its first epoch.

    Validation runs at the end of each epoch; a run capped at fewer steps than one epoch would end with no
    validation at all (no ``val/bits_per_dim`` for the likelihood models, no ``val/online_top1``).
    Returns the batch at which ``max_steps`` ends, ``ceil(max_steps / steps_per_batch) * accumulate``
    (Lightning's ``val_check_interval`` counts batches, ``max_steps`` counts optimiser steps: two a batch
    for a GAN), in that case, else None.
    """
    batches = max(1, n_train // global_batch)
    if max_steps is None or max_steps <= 0:
        return None
    last = -(-max_steps // max(1, steps_per_batch)) * max(1, accumulate)
    return None if last >= batches else last


def is_finished(run_dir: Path, checkpoint: Path) -> bool:
    """Whether a run wrote what it owes at its end (``export/``, then ``metrics.json``) after ``checkpoint``.

    An export older than the checkpoint is an earlier limit's (a resume that trained on was killed before
    its own export): not finished. Where mtimes mislead (a copy), the export is merely written again.
    """
    metrics, export = run_dir / "metrics.json", run_dir / "export" / "config.json"
    try:
        return export.is_file() and metrics.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns
    except OSError:
        return False


def _fit(cfg: dict, run_dir: Path, dm: SelfSupDataModule, model: SSLModule, resume: bool, callbacks: list,
         launcher_zero: bool) -> RunResult:
    ckpt_dir = run_dir / "checkpoints"
    if launcher_zero:  # temporary files of a killed run (checkpoint, export, metrics) go now
        for d in (run_dir, ckpt_dir, run_dir / "export"):
            clean_stale_temp_files(d)
    ckpt_path, resumed_step = None, None
    if resume:
        ckpt_path, ckpt = find_resumable_checkpoint(
            ckpt_dir, say=lambda m: print(m, file=sys.stderr) if launcher_zero else None)
        resumed_step = int(ckpt["global_step"])
        del ckpt

    probe = OnlineLinearProbe(dm.num_classes) if cfg["online_probe"] and dm.num_classes >= 2 else None
    trainer_kwargs = dict(cfg["trainer"])
    max_time = trainer_kwargs.pop("max_time", None)
    every = cfg.get("checkpoint_every")
    timer = FreshTimer(duration=max_time, interval="step") if max_time else None
    exact = ExactResume()
    keep = KeepCheckpoints(ckpt_dir, cfg.get("keep_checkpoints", 2))
    sigterm = SaveOnSigterm(ckpt_dir / "sigterm.ckpt", ckpt_dir / "interrupt.ckpt")
    cbs = [
        # all kept here, across resumes too, then bounded by KeepCheckpoints (Lightning's own bound forgets
        # the files of earlier processes)
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1, save_top_k=-1),
        # resume takes the newest checkpoint that loads, so this one needs no last.ckpt of its own
        *([ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=every, save_top_k=-1)]
          if every else []),
        keep,
        LearningRateMonitor(logging_interval="step"),
        exact,
        sigterm,
        DivergenceGuard(),
        *([timer] if timer else []),
        *([probe] if probe else []),
        *callbacks,
    ]
    if not any(isinstance(cb, ProgressBar) for cb in cbs):  # rich's bar, readable in a notebook too
        cbs.append(lightning_bar())
    loggers = [CSVLogger(save_dir=str(run_dir.parent), name=run_dir.name, version="")]
    if cfg["tensorboard"]:
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    # A user sees selfsup's own lines, the progress bar and real warnings; --verbose brings Lightning's back.
    def quiet():
        return contextlib.nullcontext() if cfg.get("verbose") else quiet_lightning()

    try:
        with quiet():
            trainer = pl.Trainer(
                **trainer_kwargs,
                enable_model_summary=bool(cfg.get("verbose")),
                default_root_dir=str(run_dir),
                callbacks=cbs,
                logger=loggers,
                plugins=[AtomicCheckpointIO()],
                num_sanity_val_steps=0,
                limit_val_batches=1.0 if (probe or model.validates) and dm.val_set is not None else 0,
                use_distributed_sampler=False,  # the train loader splits itself over ranks, resumably
            )
    except (MisconfigurationException, ValueError, TypeError) as err:
        raise ConfigError(f"trainer settings: {str(err).strip().splitlines()[0]}") from None
    # A small folder (6 batches an epoch) under the default interval (10) would log train/loss once:
    # log at least once an epoch, so the training curves of a tiny first run are curves, not dots.
    trainer.log_every_n_steps = log_interval(
        trainer.log_every_n_steps, len(dm.train_set), dm.batch_size * trainer.world_size,
        trainer.accumulate_grad_batches,
    )
    if trainer.limit_val_batches:
        last = final_validation_batch(trainer.max_steps, len(dm.train_set), dm.batch_size * trainer.world_size,
                                      trainer.accumulate_grad_batches, type(model).optimizer_steps_per_batch)
        if last is not None:  # a run shorter than an epoch still validates once, at its last step
            trainer.val_check_interval = last
    saved_config = None
    if launcher_zero:
        # on resume too: config.yaml holds what this run trains with (a larger --max-epochs, say)
        config_path = run_dir / "config.yaml"
        saved_config = config_path.read_text() if resume and config_path.is_file() else None
        atomic_write_text(config_path, yaml.safe_dump(cfg, sort_keys=False))
        set_aside_metrics(run_dir)
    try:
        with warnings.catch_warnings(), quiet():
            # metrics.csv was set aside above and is merged back below: nothing is deleted.
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            with sigterm.startup_guard():
                trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except StartupInterrupted:
        if trainer.global_step > (resumed_step or 0):  # pressed as the fit ended, its steps all trained
            raise TrainingInterrupted(f"interrupted by Ctrl-C after training (its checkpoints are kept in {ckpt_dir}; "
                                      f"write its export with: {resume_command(cfg, run_dir)})") from None
        kept = (f"nothing new; continue it with: {resume_command(cfg, run_dir)}" if resume
                else f"nothing to resume, nothing kept in {run_dir}; rerun the command to start again")
        raise TrainingInterrupted(f"interrupted by Ctrl-C before the first step ({kept})") from None
    except SecondInterrupt:  # Lightning would have said nothing and exited with 1
        if any(ckpt_dir.glob("*.ckpt")):
            how = f"continue from its last checkpoint with: {resume_command(cfg, run_dir)}"
        else:
            how = f"nothing to resume, nothing kept in {run_dir}; rerun the command to start again"
        raise TrainingInterrupted(f"interrupted by a second Ctrl-C: stopped at once, this step unsaved ({how})") from None
    except SIGTERMException:  # Lightning stopped at a batch boundary; SaveOnSigterm saved that step
        what, error = ("interrupted by Ctrl-C", TrainingInterrupted) if sigterm.interrupted else \
            ("stopped by SIGTERM", TrainingStopped)
        if sigterm.saved:
            how = f"step {trainer.global_step} saved in {sigterm.path}); continue it with: {resume_command(cfg, run_dir)}"
        elif resume:
            how = f"no new step trained); continue it with: {resume_command(cfg, run_dir)}"
        else:  # claim_run_dir removes (or empties) the directory: nothing in it could be resumed
            how = f"before its first step: nothing to resume, nothing kept in {run_dir}); rerun the command to start again"
        raise error(f"{what} ({how}") from None
    finally:
        if trainer.is_global_zero:
            merge_metrics(run_dir, resumed_step)
            keep.prune()  # after the last checkpoint of this process, the one SIGTERM saved included
    if resumed_step is not None and trainer.global_step <= resumed_step:
        if saved_config is not None:  # nothing was trained with the new settings: the run's own stay
            atomic_write_text(run_dir / "config.yaml", saved_config)
        if is_finished(run_dir, ckpt_path):
            limits = {k: cfg["trainer"][k] for k in ("max_epochs", "max_steps")}
            raise TrainingError(
                f"--resume trained no step: {run_dir.name} already reached its limits ({limits}, at step "
                f"{resumed_step}); pass a larger --max-epochs or --max-steps to continue it"
            )
        # killed after its last checkpoint, before its export: the weights are the last step's (fit restored
        # them); what the run still owes is written below
        if launcher_zero:
            print(f"selfsup: note: {run_dir.name} had trained all its steps ({resumed_step}); writing its "
                  "export and metrics.json", file=sys.stderr)
    metrics = exact.metrics(trainer)
    if trainer.is_global_zero:
        # skip_bad travels with the export (only when set: other exports' hashes stay as they were), so an
        # export copied away from its run still skips the files its run skipped
        skip = {"skip_bad": True} if cfg["data"].get("skip_bad") else {}
        model.export(run_dir / "export", data={"data": cfg["data"]["data"], "image_size": dm.image_size,
                                                 "crop_pct": dm.crop_pct, **skip})
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    limits_reached = (0 < trainer.max_steps <= trainer.global_step) or (
        0 < (trainer.max_epochs or 0) <= trainer.current_epoch)
    stopped_by_time = max_time if timer is not None and timer.stopped and not limits_reached else None
    return RunResult(run_dir, model, dm, metrics, probe, stopped_by_time, trainer.global_step,
                     resume_command(cfg, run_dir))
