"""The shared spine (backbone, SSLModule) and the contrastive and generative methods.

CPC (:mod:`selfsup.ssl.cpc`) is a pretext :class:`~selfsup.pretext.task.Task` too, so :mod:`selfsup.pretext`
imports (and so registers) it: importing it here would close an import cycle through ``pretext.task``.
Importing this package imports :mod:`selfsup.pretext` last, so :data:`METHODS` has every built-in method
however it was reached (``from selfsup.ssl.module import METHODS`` included).
"""

from selfsup.ssl import generative as _generative  # noqa: E402,F401  (registers the generative methods)
from selfsup.ssl.backbone import BACKBONES, Backbone, register_backbone
from selfsup.ssl.module import METHODS, SSLModule, load_encoder, register_method

# isort: split
import selfsup.pretext  # noqa: F401  (last: registers the pretext methods and CPC)

__all__ = ["BACKBONES", "METHODS", "Backbone", "SSLModule", "load_encoder", "register_backbone", "register_method"]
