"""Generators as representation learners: VAE, BiGAN/DCGAN, normalizing flow, PixelCNN.

Importing this package registers the generative methods in :data:`~selfsup.ssl.module.METHODS`; each
method's encoder is scored like any other method's.
"""

from selfsup.ssl.generative import flow as _flow  # noqa: F401  (registers "flow")
from selfsup.ssl.generative import gan as _gan  # noqa: F401  (registers "bigan" and "dcgan")
from selfsup.ssl.generative import pixelcnn as _pixelcnn  # noqa: F401  (registers "pixelcnn")
from selfsup.ssl.generative import vae as _vae  # noqa: F401  (registers "vae")
