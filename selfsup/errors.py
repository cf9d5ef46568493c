"""Errors that the CLI prints as one readable line instead of a traceback."""


class SelfsupError(Exception):
    """Base class of the errors selfsup raises for bad input or configuration."""


class ConfigError(SelfsupError, ValueError):
    """A bad option value: unknown backbone, method, optimiser or norm, out-of-range number."""


class DataError(SelfsupError, ValueError):
    """Bad data on disk: missing root, wrong layout, empty class, corrupt or non-image file."""
