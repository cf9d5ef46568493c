"""Silence Lightning's start-up chatter for the short internal Trainers (extraction, probes, fine-tuning).

A user's own ``selfsup pretrain`` keeps Lightning's messages; the helper Trainers that the evaluation
harness starts dozens of times do not need to announce the absence of TPUs each time. selfsup's own
warnings (skipped images, mixed image sizes) print as one ``selfsup: warning: ...`` line each
(:func:`one_line_warnings`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
_MESSAGES = (
    ".*configure_optimizers.*returned `None`.*",
    ".*module\\(s\\) in eval mode at the start of training.*",
    ".*predict returned None.*",
    ".*does not have many workers.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ".*The given NumPy array is not writable.*",
)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, Lightning logs only warnings and its known harmless warnings are hidden."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for msg in _MESSAGES:
                warnings.filterwarnings("ignore", message=msg)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


_SELFSUP_DIR = Path(__file__).resolve().parent
_PER_IMAGE = "skipping bad image"  # a streamed folder's per-file warning (it comes from each bad file)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within the block, selfsup's own warnings print as one ``selfsup: warning: ...`` line, each once.

    Python's default shows a warning as ``path/datasets.py:767: UserWarning: ...`` followed by the
    source line that raised it; a streamed folder with ``--skip-bad-images`` warned once per bad file.
    Here a warning raised in selfsup's code (or a skipped image) is one line on stderr: a message
    already shown is not repeated, and of the per-image skip warnings only the first is shown (the
    others are skipped without a line). Other libraries' warnings keep Python's format. Only the
    printed form changes (``warnings.formatwarning``): filters and recording (``catch_warnings(record=True)``,
    ``pytest.warns``) see every warning as before.
    """
    shown: set[str] = set()
    original = warnings.formatwarning

    def ours(filename: str) -> bool:
        try:
            return Path(filename).resolve().is_relative_to(_SELFSUP_DIR)
        except (OSError, ValueError):
            return False

    def one_line(message, category, filename, lineno, line=None):
        text = " ".join(str(message).split())
        per_image = text.startswith(_PER_IMAGE)
        if not (per_image or ours(filename)):
            return original(message, category, filename, lineno, line)
        key = _PER_IMAGE if per_image else text
        if key in shown:
            return ""
        shown.add(key)
        if per_image:  # the error's "replace or remove it, or pass --skip-bad-images ..." is moot here
            text = re.sub(r":? replace or remove it,? or pass .* to skip bad files\.?$", "", text)
            text += " (further bad images are skipped without a line each)"
        return f"selfsup: warning: {text}\n"

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = original
