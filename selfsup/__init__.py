"""selfsup: self-supervised representation learning for images on one shared backbone.

>>> import selfsup
>>> enc = selfsup.load_encoder("runs/rotation/export")  # doctest: +SKIP
"""

import warnings

from selfsup.startup import install_at_import

install_at_import()  # the `selfsup` command only: Ctrl-C or SIGTERM while torch loads is one line, 130 or 143

# Lightning imports tqdm.auto, which warns in a notebook without ipywidgets; selfsup draws rich's bars.
warnings.filterwarnings("ignore", message="IProgress not found")

# Importing the method modules registers them in METHODS.
from selfsup import pretext as _pretext  # noqa: E402,F401
from selfsup.eval.features import extract_features  # noqa: E402
from selfsup.ssl.backbone import BACKBONES, Backbone  # noqa: E402
from selfsup.ssl.module import METHODS, SSLModule, load_encoder  # noqa: E402

__version__ = "0.1.0"


def list_methods() -> list[str]:
    """Names of the registered methods (what ``selfsup pretrain --method`` takes)."""
    return sorted(METHODS)


def list_backbones(timm_filter: str | None = None) -> list[str]:
    """The built-in small nets, or with ``timm_filter`` (a wildcard like ``"resnet*"``) timm's models too.

    Any timm model name works as a backbone (built with ``pretrained=False``; nothing is downloaded).
    """
    names = sorted(BACKBONES)
    if timm_filter is not None:
        import timm

        names += [n for n in timm.list_models(timm_filter) if n not in names]
    return names


__all__ = ["BACKBONES", "METHODS", "Backbone", "SSLModule", "extract_features", "list_backbones", "list_methods",
           "load_encoder", "__version__"]
