"""Progress bars: one rich look for every bar selfsup draws, in a terminal and in a notebook.

Rich animates a bar in a terminal, and in Jupyter through an ipywidgets output area. Without
ipywidgets rich can only warn (``install "ipywidgets" for Jupyter support``) on every bar, so there a
bar goes to a plain console instead: it prints its final line once, when it finishes. Off a terminal
(a log file, SLURM, ``| tee``) a bar prints one line each time it passes another 10% or a minute has
gone by (:data:`LINE_EVERY_SECONDS`), with its rate and remaining time, then its final line; a transient
bar (removed when done) prints its interval lines but no final one. Lightning's training bar does the
same off a terminal (:class:`LineProgressBar`).
"""

from __future__ import annotations

import importlib.util

import pytorch_lightning as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

LINE_EVERY_SECONDS = 60.0
"""Off a terminal a bar prints a line at least this often while it moves (and at every 10%)."""


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LinePrinter:
    """Decides when a bar off a terminal prints a line: each further 10% of ``total``, or every
    :data:`LINE_EVERY_SECONDS` when it has no total (or moves slowly); formats the line."""

    def __init__(self, now: float) -> None:
        self.start, self.last_time, self.last_tenth = now, now, 0

    def line(self, description: str, completed: float, total: float | None, now: float) -> str | None:
        tenth = int(10 * completed / total) if total else 0
        if not ((total and 0 < tenth < 10 and tenth > self.last_tenth) or now - self.last_time >= LINE_EVERY_SECONDS):
            return None
        self.last_tenth, self.last_time = max(self.last_tenth, tenth), now
        elapsed = now - self.start
        rate = completed / elapsed if elapsed > 0 else 0.0
        left = (total - completed) / rate if total and rate > 0 else None
        done = f"{completed:,.0f}/{total:,.0f} ({100 * completed / total:.0f}%)" if total else f"{completed:,.0f}"
        return f"{description}: {done}, {rate:.3g}/s, {_clock(elapsed)} elapsed, {_clock(left)} left"


class LoggedProgress(Progress):
    """A rich ``Progress`` that, off a terminal, prints a line per task at every 10% or minute (see
    :class:`LinePrinter`); in a terminal it is rich's own."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lines = not (self.console.is_terminal or self.console.is_jupyter) and not self.disable
        self._printers: dict[TaskID, LinePrinter] = {}

    def _maybe_line(self, task_id: TaskID) -> None:
        if not self._lines:
            return
        task = self._tasks[task_id]
        now = self.get_time()
        printer = self._printers.setdefault(task_id, LinePrinter(now if task.start_time is None else task.start_time))
        text = printer.line(task.description, task.completed, task.total, now)
        if text is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_line(task_id)


def notebook_without_widgets() -> bool:
    """Whether this runs in a Jupyter kernel that lacks ipywidgets (where rich cannot animate a bar)."""
    return Console().is_jupyter and importlib.util.find_spec("ipywidgets") is None


def console_kwargs() -> dict:
    """Settings of rich's ``Console`` for a bar: none, or in a notebook without ipywidgets a plain console."""
    return {"force_jupyter": False, "force_terminal": False} if notebook_without_widgets() else {}


def make_progress(*columns, enabled: bool = True, transient: bool = False, console: Console | None = None) -> Progress:
    """A rich ``Progress`` with selfsup's columns (description, bar, done/total, time) that works in notebooks.

    Args:
        columns: rich columns; :data:`COLUMNS` when none are given.
        enabled: False draws nothing at all.
        transient: remove the bar when it finishes (else its final line stays); off a terminal (a log, a
            pipe) such a bar draws nothing.
        console: where to draw; a new console on stdout (see :func:`console_kwargs`) when None.
    """
    if console is None:
        console = Console(**console_kwargs())
        if not (console.is_terminal or console.is_jupyter):  # a log or a pipe: 120 columns, not rich's 80
            console = Console(**console_kwargs(), width=max(console.width, 120))
    if transient and not (console.is_terminal or console.is_jupyter):
        # off a terminal a transient bar has no final line: rich printed an empty line instead
        # (`selfsup sweep ... | cat`). Only the interval lines are printed.
        progress = LoggedProgress(*(columns or COLUMNS), console=console, disable=True, transient=transient)
        progress._lines = enabled
        return progress
    return LoggedProgress(*(columns or COLUMNS), console=console, disable=not enabled, transient=transient)


class BarCallback(pl.Callback):
    """A Lightning callback drawing one selfsup bar over a ``total`` of something (images, steps).

    Subclasses call :meth:`start` when their loop begins and :meth:`advance` as it goes; the bar stops
    when the loop ends or fails. Rank 0 alone draws (``start`` is a no-op elsewhere).

    Args:
        description: the bar's label.
        total: what the bar counts up to.
        console: where to draw (see :func:`make_progress`).
    """

    def __init__(self, description: str, total: int, console: Console | None = None) -> None:
        self.description, self.total, self.console = description, total, console
        self.progress: Progress | None = None

    def start(self, trainer: pl.Trainer, *columns, transient: bool = False) -> None:
        if trainer.is_global_zero:
            self.progress = make_progress(*columns, transient=transient, console=self.console)
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total)

    def advance(self, completed: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=min(self.total, completed))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class LineProgressBar(pl.callbacks.ProgressBar):
    """Lightning's training progress off a terminal: one line at every 10% of the run's optimiser steps, or
    every minute (:class:`LinePrinter`), with the epoch, steps, rate, remaining time and the bar's metrics."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self._enabled = True
        self.console = console or Console(width=200)
        self.printer: LinePrinter | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self.printer = LinePrinter(time.monotonic())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        import math
        import time

        if not (self._enabled and trainer.is_global_zero and self.printer is not None):
            return
        total = trainer.estimated_stepping_batches
        total = total if isinstance(total, (int, float)) and math.isfinite(total) and total > 0 else None
        epochs = f"/{trainer.max_epochs - 1}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        text = self.printer.line(f"Epoch {trainer.current_epoch}{epochs} steps", trainer.global_step, total,
                                 time.monotonic())
        if text is not None:
            metrics = ", ".join(f"{k} {float(v):.4g}" for k, v in self.get_metrics(trainer, pl_module).items()
                                if k != "v_num" and isinstance(v, (int, float)))
            self.console.print(text + (f", {metrics}" if metrics else ""), markup=False, highlight=False,
                               soft_wrap=True)


def lightning_bar(plain: bool | None = None):
    """Lightning's rich progress bar for training, drawn on a plain console in a notebook without ipywidgets;
    off a terminal (``plain``, by default when stdout is neither a terminal nor a notebook) a
    :class:`LineProgressBar` printing a line at every 10% or minute.

    Its description says ``Epoch 3/9`` (the last epoch's index) when ``max_epochs`` bounds the run, and
    ``Epoch 3`` when it does not (``--max-epochs -1``, a run ended by ``--max-steps`` or ``--max-time``),
    where Lightning's own would print ``Epoch 3/-2``.
    """
    from pytorch_lightning.callbacks import RichProgressBar

    if plain is None:
        console = Console()
        plain = not (console.is_terminal or console.is_jupyter) and not notebook_without_widgets()
    if plain:
        return LineProgressBar()

    class Bar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            text = super()._get_train_description(current_epoch)
            if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
                text = text.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
            return text

    return Bar(console_kwargs=console_kwargs() or None)
