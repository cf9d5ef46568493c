"""The shared spine (backbone, SSLModule, the evaluation encoders) and the contrastive and generative methods.

Importing this package imports nothing heavy: its names load on first use. :mod:`selfsup.ssl.module`
(Lightning) imports every built-in method when it is imported, so :data:`METHODS` has all of them however
it was reached; :mod:`selfsup.ssl.encoders` and :mod:`selfsup.ssl.backbone` import no Lightning.
"""

from typing import TYPE_CHECKING

from selfsup.lazy import lazy_exports

if TYPE_CHECKING:
    from selfsup.ssl.backbone import BACKBONES, Backbone, register_backbone
    from selfsup.ssl.encoders import load_encoder
    from selfsup.ssl.module import METHODS, SSLModule, register_method

_LAZY = {
    "BACKBONES": "selfsup.ssl.backbone",
    "Backbone": "selfsup.ssl.backbone",
    "register_backbone": "selfsup.ssl.backbone",
    "load_encoder": "selfsup.ssl.encoders",
    "METHODS": "selfsup.ssl.module",
    "SSLModule": "selfsup.ssl.module",
    "register_method": "selfsup.ssl.module",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)


__all__ = ["BACKBONES", "METHODS", "Backbone", "SSLModule", "load_encoder", "register_backbone", "register_method"]
