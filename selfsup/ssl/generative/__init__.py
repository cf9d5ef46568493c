"""Generative models as representation learners: BiGAN/ALI and DCGAN (gan.py)."""

from selfsup.ssl.generative import gan as _gan  # noqa: F401  (registers "bigan" and "dcgan" in METHODS)
