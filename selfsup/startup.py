"""Ctrl-C and SIGTERM outside training: one line and the shell's exit status, never a traceback.

Two phases (training has its own handling, :class:`selfsup.resume.SaveOnSigterm`):

- **Start-up**, while ``selfsup`` and its libraries (torch, Lightning) are imported: nothing is written yet, so
  Ctrl-C or SIGTERM print one line and end the process at once, with 130 or 143 (128 + the signal). Python's
  own handling printed a ``KeyboardInterrupt`` traceback from inside torch's import, and SIGTERM ended the
  process with no word. :func:`install_at_import` sets this up; ``selfsup/__init__.py`` calls it first thing,
  only in the ``selfsup`` command's process (``import selfsup`` in a notebook or a script changes nothing).
- **The command** (:func:`command_signals`, around ``selfsup.cli.main``): Ctrl-C raises ``KeyboardInterrupt``
  and SIGTERM raises :class:`Terminated` where the command is, so what it was writing is cleaned up as on any
  error (a run folder claimed before its first step is removed, a temporary file goes), then the CLI prints
  one line and exits with 130 or 143. During ``trainer.fit`` Lightning installs its own SIGTERM handler, which
  calls the one it found (this one): called that way, this one does nothing and Lightning stops the run at a
  step boundary.

Only the standard library is imported here, so that the start-up handlers are in place before torch loads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(BaseException):
    """SIGTERM arrived outside training. A ``BaseException``, like ``KeyboardInterrupt``, so that no
    ``except Exception`` (a skipped bad image, a fallback) takes it for an ordinary error and carries on."""


def what(signum: int) -> str:
    """``interrupted by Ctrl-C`` or ``stopped by SIGTERM``: the words of selfsup's lines for a signal."""
    return "interrupted by Ctrl-C" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def is_selfsup_command() -> bool:
    """Whether this process is the ``selfsup`` command: the console script, or ``python -m selfsup``."""
    if os.path.basename(sys.argv[0] if sys.argv else "").removesuffix(".exe") in ("selfsup", "selfsup-script.py"):
        return True
    argv = list(getattr(sys, "orig_argv", ()))
    for i, arg in enumerate(argv[1:], 1):
        if arg == "-m":
            return argv[i + 1:i + 2] == ["selfsup"]
        if arg == "-mselfsup":
            return True
        if arg in ("-c", "-") or not arg.startswith("-"):  # a script or -c code: not the command
            return False
    return False


def _exit_at_start(signum: int, frame) -> None:
    print(f"selfsup: {what(signum)} while starting (nothing was written)", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(EXIT_CODES.get(signum, 128 + signum))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install_at_import() -> None:
    """In the ``selfsup`` command's process: Ctrl-C or SIGTERM while importing end it with one line. A signal
    the process was started to ignore (``nohup``, a background job's Ctrl-C) stays ignored."""
    if not _main_thread() or not is_selfsup_command():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _exit_at_start)


_LIGHTNING_STOPS_TRAINING = False


def lightning_stops_training(on: bool) -> None:
    """Set while pretraining's fit runs (:class:`~selfsup.resume.SaveOnSigterm`): Lightning's SIGTERM handler,
    which calls this module's, then stops the run at a step boundary and the step is saved. Any other run of
    Lightning (feature extraction's ``predict``, a fine-tuning fit) does not stop on SIGTERM by itself (the
    extraction went on to its end): there this handler raises :class:`Terminated`, as outside Lightning."""
    global _LIGHTNING_STOPS_TRAINING
    _LIGHTNING_STOPS_TRAINING = on


def _raise_terminated(signum: int, frame) -> None:
    if _LIGHTNING_STOPS_TRAINING and signal.getsignal(signal.SIGTERM) is not _raise_terminated:
        return  # called by Lightning's handler in pretraining: that one stops the run and the step is saved
    raise Terminated


@contextlib.contextmanager
def command_signals() -> Iterator[None]:
    """While a command runs: Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated` (see the
    module's docstring); the handlers before are restored afterwards. Ignored signals stay ignored."""
    if not _main_thread():
        yield
        return
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
    previous = {s: signal.getsignal(s) for s in handlers}
    for signum, handler in handlers.items():
        if previous[signum] is not signal.SIG_IGN:
            signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def ignore_further_signals() -> None:
    """Once the command is ending on a signal: a further Ctrl-C or SIGTERM does not cut its last line."""
    if _main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, signal.SIG_IGN)


def _forked_child_defaults() -> None:
    """In a forked worker (a decoding pool's, a DataLoader's): the signals' defaults, not these handlers.
    ``pool.terminate()`` ends its workers with SIGTERM: a Python handler would print a traceback in each, or
    never run in a worker stuck in C, and the pool's join would wait for ever; the default ends it at once."""
    if signal.getsignal(signal.SIGTERM) in (_raise_terminated, _exit_at_start):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is _exit_at_start:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child_defaults)
