"""Lightning's progress bars in selfsup's look: a callback drawing one bar, and the training bar.

Split from :mod:`selfsup.progress` (which re-exports these names) so that drawing a bar outside Lightning
imports no Lightning.
"""

from __future__ import annotations

import pytorch_lightning as pl
from rich.console import Console
from rich.progress import Progress

from selfsup import progress as _progress  # make_progress read on use (tests and notebooks replace it)
from selfsup.progress import LinePrinter, console_kwargs, notebook_without_widgets


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
            self.progress = _progress.make_progress(*columns, transient=transient, console=self.console)
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
