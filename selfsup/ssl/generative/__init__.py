"""Generators as representation learners: each method's encoder is scored like any other method's.

Importing this package registers the generative methods in :data:`~selfsup.ssl.module.METHODS`.
"""

from selfsup.ssl.generative import vae as _vae  # noqa: F401  (registers "vae")
