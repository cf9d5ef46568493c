"""Silence Lightning's start-up chatter for the short internal Trainers (extraction, probes, fine-tuning).

A user's own ``selfsup pretrain`` keeps Lightning's messages; the helper Trainers that the evaluation
harness starts dozens of times do not need to announce the absence of TPUs each time.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

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
