"""Progress bars: one rich look for every bar selfsup draws, in a terminal and in a notebook.

Rich animates a bar in a terminal, and in Jupyter through an ipywidgets output area. Without
ipywidgets rich can only warn (``install "ipywidgets" for Jupyter support``) on every bar, so there a
bar goes to a plain console instead: it prints its final line once, when it finishes. Off a terminal
(a log file, SLURM, ``| tee``) a bar prints one line each time it passes another 10% or a minute has
gone by (:data:`LINE_EVERY_SECONDS`), with its rate and remaining time, then its final line; a transient
bar (removed when done) prints its interval lines but no final one. Lightning's training bar does the
same off a terminal (:class:`LineProgressBar`).

Lightning's bars (:class:`BarCallback`, :class:`LineProgressBar`, :func:`lightning_bar`) live in
:mod:`selfsup.lightning_progress` and load from here on first use: the rest imports no Lightning.
"""

from __future__ import annotations

import importlib.util

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


_LIGHTNING = ("BarCallback", "LineProgressBar", "lightning_bar")


def __getattr__(name: str):
    if name in _LIGHTNING:
        from selfsup import lightning_progress

        globals()[name] = value = getattr(lightning_progress, name)
        return value
    raise AttributeError(f"module 'selfsup.progress' has no attribute {name!r}")
