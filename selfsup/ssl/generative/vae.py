"""Variational autoencoder whose encoder is the shared backbone; its posterior mean is the representation.

The backbone's pooled features map linearly to the mean and log-variance of a diagonal Gaussian
posterior ``q(z|x)``; a transposed-conv decoder maps ``z`` to the parameters of a factorised 8-bit
image likelihood (discretised logistic by default). Training maximises the beta-weighted evidence
lower bound ``E_q[log p(x|z)] - beta * KL(q(z|x) || N(0, I))`` with the reparameterisation trick;
validation reports the negative ELBO at ``beta = 1`` (a bound on the negative log-likelihood) in
bits/dim as ``val/bits_per_dim`` and writes a grid of samples and reconstructions every epoch.

- [0] Auto-Encoding Variational Bayes, Kingma & Welling 2014, https://arxiv.org/abs/1312.6114
- [1] beta-VAE, Higgins et al. 2017, https://openreview.net/forum?id=Sy2fzU9gl
- [2] PixelCNN++ (discretised logistic likelihood), Salimans et al. 2017, https://arxiv.org/abs/1701.05517
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from selfsup.data.transforms import to_float
from selfsup.errors import ConfigError
from selfsup.ssl.generative.common import (
    ConvDecoder,
    PixelLikelihood,
    PosteriorMeanEncoder,  # noqa: F401  (re-exported: it lived here first)
    bits_per_dim,
    sample_dir,
    save_image_grid,
)
from selfsup.ssl.module import ImageEncoder, SSLModule, register_method

PROBE_FEATURES = ("mean", "backbone")


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, diag(exp(logvar))) || N(0, I))`` per row, in closed form (Kingma & Welling, app. B).

    Shape:
        - Input: ``(B, Z)`` each -> Output: ``(B,)`` nats
    """
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(1)


def negative_elbo(
    images: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    samples: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction term and KL of the negative ELBO, each per image, with reparameterised samples of z.

    Args:
        images: the data the likelihood scores.
        mean, logvar: the posterior's parameters.
        decode: ``z (N, Z) -> params``.
        log_prob: ``(images, params) -> (N,)`` log-likelihood in nats.
        samples: Monte-Carlo samples of ``z`` per image (the reconstruction term is their average).

    Shape:
        - Input: ``images (B, ...)``, ``mean`` and ``logvar`` ``(B, Z)``
        - Output: ``-E_q[log p(x|z)]`` and ``KL(q || p)``, each ``(B,)`` nats
    """
    b = mean.shape[0]
    eps = torch.randn(samples, *mean.shape, device=mean.device, dtype=mean.dtype)  # (S, B, Z)
    z = (mean + (0.5 * logvar).exp() * eps).flatten(0, 1)  # (S, B, Z) -> (S*B, Z)
    repeated = images.expand(samples, *images.shape).flatten(0, 1)  # (S*B, ...)
    nll = -log_prob(repeated, decode(z)).view(samples, b).mean(0)  # (S*B,) -> (S, B) -> (B,)
    return nll, gaussian_kl(mean, logvar)


@register_method("vae")
class VAE(SSLModule):
    """Variational autoencoder on the shared backbone (Kingma & Welling 2014), beta-weighted ELBO.

    Args:
        latent_dim: size of z.
        beta: weight of the KL term in the training loss (1: the ELBO; validation always reports beta = 1).
        likelihood: image likelihood, ``logistic`` (discretised logistic over 256 values, bits/dim
            comparable to published 8-bit numbers) or ``bernoulli`` (images binarised at 1/2).
        logistic_components: discretised logistics in the per-subpixel mixture (1: a single logistic).
        decoder_width: channels of the decoder's last (full-resolution) stage; earlier stages double it.
        probe_features: what the exported encoder gives: ``mean`` (posterior mean of z) or
            ``backbone`` (the pooled backbone features); recorded in the export's config.
        image_size: side of the images the decoder generates; set from the data by ``selfsup pretrain``.
    """

    base_defaults = {"optimizer": "adamw", "lr": 1e-3, "crop_scale": 1.0}
    validates = True

    def __init__(
        self,
        *,
        latent_dim: int = 128,
        beta: float = 1.0,
        likelihood: str = "logistic",
        logistic_components: int = 1,
        decoder_width: int = 32,
        probe_features: str = "mean",
        image_size: int = 32,
        **base,
    ) -> None:
        super().__init__(**(self.base_defaults | base))
        if latent_dim < 1:
            raise ConfigError(f"latent_dim must be positive, got {latent_dim!r}")
        if beta < 0:
            raise ConfigError(f"beta must be >= 0, got {beta!r}")
        if probe_features not in PROBE_FEATURES:
            raise ConfigError(f"probe_features must be one of {PROBE_FEATURES}, got {probe_features!r}")
        self.likelihood = PixelLikelihood(likelihood, channels=3, components=logistic_components)
        self.posterior = nn.Linear(self.backbone.num_features, 2 * latent_dim)
        with torch.no_grad():  # start from posterior std 0.1, not 1: z carries x to the decoder from the first step
            self.posterior.bias[latent_dim:].fill_(2 * math.log(0.1))
        self.decoder = ConvDecoder(latent_dim, self.likelihood.param_channels, image_size, width=decoder_width)
        self._shown: torch.Tensor | None = None  # the first val images, reconstructed in the grid
        self._announced = False

    @property
    def num_features(self) -> int:
        if self.hparams.probe_features == "mean":
            return self.hparams.latent_dim
        return self.backbone.num_features

    def encoder(self) -> nn.Module:
        if self.hparams.probe_features == "mean":
            return PosteriorMeanEncoder(self.backbone, self.normalize, self.posterior)
        return ImageEncoder(self.backbone, self.normalize)

    def _terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image reconstruction and KL terms in bits/dim, the posterior, and the probed features."""
        if x.shape[-1] != self.hparams.image_size or x.shape[-2] != self.hparams.image_size:
            size = self.hparams.image_size
            raise ConfigError(f"vae was built for {size}x{size} images, got {tuple(x.shape[-2:])}")
        feats = self.backbone(self.normalize(x))  # (B, D)
        mean, logvar = self.posterior(feats).chunk(2, dim=1)  # (B, 2Z) -> (B, Z) each
        nll, kl = negative_elbo(x, mean, logvar, self.decoder, self.likelihood.log_prob)
        dims = x[0].numel()  # C*H*W
        probed = mean if self.hparams.probe_features == "mean" else feats
        return {"recon": bits_per_dim(nll, dims), "kl": bits_per_dim(kl, dims), "mean": mean, "features": probed}

    def loss(self, batch):
        t = self._terms(self.augment(batch[0]))
        elbo = t["recon"] + t["kl"]  # (B,) negative ELBO in bits/dim
        return {
            "loss": (t["recon"] + self.hparams.beta * t["kl"]).mean(),
            "bits_per_dim": elbo.mean().detach(),
            "kl_bits_per_dim": t["kl"].mean().detach(),
            "features": t["features"].detach(),
        }

    def validation_step(self, batch, batch_idx: int):
        x = self.augment(batch[0])  # eval mode: uint8 -> [0, 1], no augmentation
        t = self._terms(x)
        n = x.shape[0]
        self.log("val/bits_per_dim", (t["recon"] + t["kl"]).mean(), batch_size=n, sync_dist=True, prog_bar=True)
        self.log("val/kl_bits_per_dim", t["kl"].mean(), batch_size=n, sync_dist=True)
        if batch_idx == 0:
            self._shown = x[:8]
        return None

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` images in [0, 1] decoded from z ~ N(0, I) (the likelihood's mean, not a noisy draw).

        Shape:
            - Output: ``(n, 3, image_size, image_size)``
        """
        z = torch.randn(n, self.hparams.latent_dim, generator=torch.Generator().manual_seed(seed))
        return self.likelihood.mean(self.decoder(z.to(self.device)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] decoded from their posterior means.

        Shape:
            - Input: ``(B, 3, H, W)`` in [0, 1] or uint8 -> Output: ``(B, 3, H, W)`` in [0, 1]
        """
        mean = self._terms(to_float(x))["mean"]
        return self.likelihood.mean(self.decoder(mean))

    def on_validation_epoch_end(self) -> None:
        out = sample_dir(self.trainer)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or out is None or self._shown is None:
            return
        shown = self._shown
        grid = torch.cat([self.sample(16), shown, self.reconstruct(shown)])  # rows: 2 of samples, originals, recons
        path = save_image_grid(grid, out / f"epoch_{self.current_epoch:03d}.png", nrow=8)
        if not self._announced:
            print(f"vae: samples and reconstructions every epoch in {path.parent} (rows: 2 of samples, originals, "
                  "their reconstructions)")
            self._announced = True
