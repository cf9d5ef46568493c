"""Generators as representation learners: VAE, BiGAN/DCGAN, normalizing flow."""

from selfsup.ssl.generative import flow as _flow  # noqa: F401  (registers "flow" in METHODS)
