"""selfsup: self-supervised representation learning for images on one shared backbone.

>>> import selfsup
>>> enc = selfsup.load_encoder("runs/rotation/export")  # doctest: +SKIP

Importing the package imports nothing heavy: ``selfsup.METHODS``, ``selfsup.load_encoder`` and the other
names below import torch, Lightning and the methods on first use, so ``selfsup --help`` answers at once.
``load_encoder`` and ``extract_features`` import no Lightning (evaluating an export never needs it); ``METHODS``
and ``SSLModule`` do.
"""

import warnings
from typing import TYPE_CHECKING

from selfsup.lazy import lazy_exports
from selfsup.startup import install_at_import

install_at_import()  # the `selfsup` command only: Ctrl-C or SIGTERM while torch loads is one line, 130 or 143

# Lightning imports tqdm.auto, which warns in a notebook without ipywidgets; selfsup draws rich's bars.
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers and the API docs; at run time __getattr__ imports these on first use
    from selfsup.eval.features import extract_features
    from selfsup.ssl.backbone import BACKBONES, Backbone
    from selfsup.ssl.encoders import load_encoder
    from selfsup.ssl.module import METHODS, SSLModule

_LAZY = {  # public name -> the module defining it (importing selfsup.ssl registers every built-in method)
    "BACKBONES": "selfsup.ssl.backbone",
    "Backbone": "selfsup.ssl.backbone",
    "METHODS": "selfsup.ssl.module",
    "SSLModule": "selfsup.ssl.module",
    "load_encoder": "selfsup.ssl.encoders",
    "extract_features": "selfsup.eval.features",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)


def list_methods() -> list[str]:
    """Names of the registered methods (what ``selfsup pretrain --method`` takes)."""
    from selfsup.ssl.module import METHODS

    return sorted(METHODS)


def list_backbones(timm_filter: str | None = None) -> list[str]:
    """The built-in small nets, or with ``timm_filter`` (a wildcard like ``"resnet*"``) timm's models too.

    Any timm model name works as a backbone (built with ``pretrained=False``; nothing is downloaded).
    """
    from selfsup.ssl.backbone import BACKBONES

    names = sorted(BACKBONES)
    if timm_filter is not None:
        import timm

        names += [n for n in timm.list_models(timm_filter) if n not in names]
    return names


__all__ = ["BACKBONES", "METHODS", "Backbone", "SSLModule", "extract_features", "list_backbones", "list_methods",
           "load_encoder", "__version__"]
