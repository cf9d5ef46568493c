"""Names a package loads on first use (PEP 562), so that importing it imports nothing heavy.

>>> __getattr__, __dir__ = lazy_exports(__name__, globals(), {"Backbone": "selfsup.ssl.backbone"})  # doctest: +SKIP

Only the standard library is imported here: the packages that use it must stay light to import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, namespace: dict, table: dict[str, str]) -> tuple[Callable, Callable]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``: a name of ``table`` (name -> the module
    defining it) is imported on first access and kept in ``namespace``, so later lookups skip this."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__
