"""Errors that the CLI prints as one readable line instead of a traceback."""


class SelfsupError(Exception):
    """Base class of the errors selfsup raises for bad input or configuration."""


class ConfigError(SelfsupError, ValueError):
    """A bad option value: unknown backbone, method, optimiser or norm, out-of-range number."""


class DataError(SelfsupError, ValueError):
    """Bad data on disk: missing root, wrong layout, empty class, corrupt or non-image file."""


class RunDirError(SelfsupError, OSError):
    """A run directory that cannot be used: taken by another run, read-only or full."""


class CheckpointError(SelfsupError, ValueError):
    """A checkpoint or export that cannot be loaded: empty, truncated, foreign, or not matching its config."""


class TrainingError(SelfsupError, RuntimeError):
    """Training that cannot go on: a NaN or infinite loss, or a resume with nothing left to train."""


class TrainingStopped(TrainingError):
    """Training stopped by SIGTERM; its last step was checkpointed and ``--resume`` continues it.

    The CLI exits with 143 (128 + SIGTERM), as a process killed by the signal would, so a scheduler or
    script sees that the run did not finish.
    """

    exit_code = 143


class TrainingInterrupted(TrainingStopped):
    """Training stopped by Ctrl-C (SIGINT); its last step was checkpointed and ``--resume`` continues it.

    The CLI exits with 130 (128 + SIGINT), as a shell reports a command stopped by Ctrl-C.
    """

    exit_code = 130
