"""What a checkpoint must hold for a resumed run to continue exactly where the killed one stopped.

Lightning saves the weights, optimiser, schedulers, loop counters and (through
:class:`~selfsup.data.sampler.ResumableLoader`) the data position. :class:`ExactResume` adds the random
number generators (torch CPU and CUDA, numpy, Python), restored when training starts again, so the
resumed run draws the same augmentations; it also flushes the loggers when a checkpoint is written, so
no logged row older than the checkpoint is lost to a kill. :class:`FreshTimer` is ``--max-time``
counted afresh on every (re)start: a run stopped by its time limit and resumed trains again.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, Timer

from selfsup import startup


def rng_state() -> dict:
    """Every RNG training draws from, as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


METRICS_KEY = "selfsup_metrics"


class ExactResume(Callback):
    """Saves the RNG states in every checkpoint and restores them when a resumed run starts training.

    Every checkpoint also holds the run's latest logged values (``trainer.callback_metrics``): a resumed
    process logs only what it trains, so ``metrics.json`` is these values overlaid with the new ones, the
    same dictionary an uninterrupted run ends with (``val/online_top1`` of an epoch the resumed process did
    not validate, the learning rates, a finished run's whole set).
    """

    def __init__(self) -> None:
        self._pending: dict | None = None
        self.restored_metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def state_dict(self) -> dict:
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning builds the train loader early (to estimate the stepping batches for the LR schedule),
        # before it restores the loop state, and then never hands the loader its saved position: hand it
        # now (a no-op when there is none or it was already loaded). The sampler reads it lazily, at the
        # first batch, so it still applies.
        loop = trainer.fit_loop
        pending = bool(getattr(loop, "_combined_loader_states_to_load", None))
        load_positions = getattr(loop, "_load_combined_loader_states", None)
        if load_positions is not None:
            load_positions()
        # With loader workers the iterator Lightning made then has already begun reading (workers prefetch,
        # iterating the sampler) from the epoch's start: make it again, so it starts at the saved position.
        fetcher = getattr(loop, "_data_fetcher", None)
        if pending and fetcher is not None:
            iter(fetcher)
        # After Lightning built the loaders (which may draw from the RNG), just before the first step.
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:  # rows logged before this checkpoint must survive a kill after it
            logger.save()
        checkpoint[METRICS_KEY] = self.metrics(trainer)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.restored_metrics = dict(checkpoint.get(METRICS_KEY) or {})

    def metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The run's latest value of every scalar logged: the restored ones, overlaid with this process's."""
        now = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        return {**self.restored_metrics, **now}


class FreshTimer(Timer):
    """Lightning's ``max_time`` limit, counted from this (re)start: the elapsed time of a killed or
    time-limited run is not carried into its resume (which would stop it before a single step)."""

    stopped = False
    """Whether the time limit stopped the run (rather than its step or epoch limit)."""

    def load_state_dict(self, state_dict: dict) -> None:
        return None

    def _check_time_remaining(self, trainer: pl.Trainer) -> None:
        before = trainer.should_stop
        super()._check_time_remaining(trainer)
        if trainer.should_stop and not before:
            self.stopped = True


class StartupInterrupted(Exception):
    """Ctrl-C before training started (Lightning turns a ``KeyboardInterrupt`` into ``sys.exit(1)``)."""


class SecondInterrupt(BaseException):
    """The second Ctrl-C in training: stop at once, unsaved. Not a ``KeyboardInterrupt``, which Lightning turns
    into ``sys.exit(1)`` with no word; a ``BaseException``, so that Lightning passes it on."""


class SaveOnSigterm(Callback):
    """On SIGTERM (a scheduler's pre-emption, ``kill``) or Ctrl-C (SIGINT), save the step Lightning stopped at.

    Lightning answers SIGTERM by finishing the current batch and raising ``SIGTERMException`` (on every
    rank under DDP: rank 0 broadcasts the signal), so the state saved here is a whole step's, the same a
    step checkpoint would hold; resume picks the newest checkpoint, so it continues from this step.
    Ctrl-C is turned into the same request while training runs (a ``KeyboardInterrupt`` may arrive inside
    an optimiser step, whose state is not whole): the step is saved in ``interrupt_path``. A second Ctrl-C
    stops at once, without saving.

    A signal that arrives during the end-of-epoch validation waits for that validation to end: Lightning
    would stop between two validation batches, and a resume never redoes a validation it was inside, so
    that epoch's row would be missing from ``metrics.csv``.
    """

    def __init__(self, path, interrupt_path=None) -> None:
        self.path = path
        self.sigterm_path = path
        self.interrupt_path = interrupt_path if interrupt_path is not None else path
        self.saved = False
        self.interrupted = False
        self._previous = None
        self._deferred = False
        self._in_validation = False
        self._previous_sigterm = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        startup.lightning_stops_training(True)  # the CLI's SIGTERM handler leaves the stop to Lightning now

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":  # a validation of its own (trainer.validate) stops where it is asked to
            return
        self._in_validation = True
        if trainer._signal_connector.received_sigterm:  # arrived in the last training batch: after this
            trainer._signal_connector.received_sigterm = False
            self._deferred = True
        if threading.current_thread() is threading.main_thread():
            def on_sigterm(signum, frame) -> None:
                self._deferred = True

            self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._in_validation:
            return
        self._in_validation = False
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if self._deferred:  # the training loop stops at its next check, with this validation whole
            trainer._signal_connector.received_sigterm = True
            self._deferred = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):  # a background job that ignores Ctrl-C keeps ignoring it
            return

        def on_sigint(signum, frame) -> None:
            if self.interrupted:  # the second Ctrl-C: stop now
                self._restore()
                raise SecondInterrupt
            self.interrupted = True
            self.path = self.interrupt_path
            if self._in_validation:
                self._deferred = True  # stop once this validation is whole
            else:
                trainer._signal_connector.received_sigterm = True  # stop at the next batch boundary, as SIGTERM

        self._previous = previous
        signal.signal(signal.SIGINT, on_sigint)

    @contextlib.contextmanager
    def startup_guard(self):
        """Around ``trainer.fit``: a Ctrl-C before the first step raises :class:`StartupInterrupted`."""
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
            yield
            return

        def on_sigint(signum, frame) -> None:
            raise StartupInterrupted

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _restore(self) -> None:
        startup.lightning_stops_training(False)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        try:  # Ctrl-C stays this callback's while the step is saved: a second one stops the save at once
            if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
                trainer.save_checkpoint(self.path)
                self.saved = True
        finally:
            self._restore()


class KeepCheckpoints(Callback):
    """Keeps a run's checkpoints few: after each save, :func:`~selfsup.checkpoint.prune_checkpoints`.

    The files are pruned at the next batch (a checkpoint callback writes after every other callback's hook
    of the same moment) and once more when the run ends (:meth:`prune`), on global rank zero only.
    """

    def __init__(self, directory, keep: int) -> None:
        self.directory = directory
        self.keep = keep
        self._saved = True  # the checkpoints of earlier processes, at the first batch
        self._steps: dict = {}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._saved = True

    def on_train_batch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if self._saved and trainer.is_global_zero:
            self.prune()

    def prune(self) -> None:
        from selfsup.checkpoint import prune_checkpoints

        self._saved = False
        prune_checkpoints(self.directory, self.keep, self._steps)

