"""selfsup: self-supervised representation learning for images on one shared backbone.

>>> import selfsup
>>> enc = selfsup.load_encoder("runs/rotation/export")  # doctest: +SKIP
"""

# Importing the method modules registers them in METHODS.
from selfsup import pretext as _pretext  # noqa: E402,F401
from selfsup.eval.features import extract_features
from selfsup.ssl.backbone import BACKBONES, Backbone
from selfsup.ssl.module import METHODS, SSLModule, load_encoder

__version__ = "0.1.0"
__all__ = ["BACKBONES", "METHODS", "Backbone", "SSLModule", "extract_features", "load_encoder", "__version__"]
