"""Progress bars: one rich look for every bar selfsup draws, in a terminal and in a notebook.

Rich animates a bar in a terminal, and in Jupyter through an ipywidgets output area. Without
ipywidgets rich can only warn (``install "ipywidgets" for Jupyter support``) on every bar, so there a
bar goes to a plain console instead: it prints its final line once, when it finishes. The same holds
off a terminal (output piped or logged): a bar prints its final line once, and a transient bar
(removed when done) prints nothing, not an empty line.
"""

from __future__ import annotations

import importlib.util

import pytorch_lightning as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


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
        # off a terminal a bar only prints its final line, and a transient bar has none: rich printed an
        # empty line instead (`selfsup sweep ... | cat`). Draw nothing.
        enabled = False
    return Progress(*(columns or COLUMNS), console=console, disable=not enabled, transient=transient)


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


def lightning_bar():
    """Lightning's rich progress bar for training, drawn on a plain console in a notebook without ipywidgets.

    Its description says ``Epoch 3/9`` (the last epoch's index) when ``max_epochs`` bounds the run, and
    ``Epoch 3`` when it does not (``--max-epochs -1``, a run ended by ``--max-steps`` or ``--max-time``),
    where Lightning's own would print ``Epoch 3/-2``.
    """
    from pytorch_lightning.callbacks import RichProgressBar

    class Bar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            text = super()._get_train_description(current_epoch)
            if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
                text = text.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
            return text

    return Bar(console_kwargs=console_kwargs() or None)
