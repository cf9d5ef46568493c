"""Generators as representation learners: VAE, BiGAN/DCGAN, normalizing flow, PixelCNN.

Each method's module registers it in :data:`~selfsup.ssl.module.METHODS` when imported (importing
:mod:`selfsup.ssl.module` imports them all); their networks and exported encoders
(:mod:`~selfsup.ssl.generative.flow_layers`, :mod:`~selfsup.ssl.generative.pixelcnn_net`,
:mod:`~selfsup.ssl.generative.common`) import no Lightning, so importing this package alone imports nothing.
Each method's encoder is scored like any other method's.
"""
