"""Pieces shared by the generative methods: 8-bit image likelihoods, bits/dim, transposed-conv decoder, sample grids.

Likelihoods are over the 256 values of an 8-bit pixel, so a negative log-likelihood in bits/dim is
comparable to published numbers (PixelCNN++, RealNVP, Glow report nats / (C*H*W * ln 2)).

- [0] PixelCNN++: Improving the PixelCNN with Discretized Logistic Mixture Likelihood, Salimans et al. 2017,
  https://arxiv.org/abs/1701.05517
- [1] Unsupervised Representation Learning with Deep Convolutional GANs (DCGAN), Radford et al. 2016,
  https://arxiv.org/abs/1511.06434 (the transposed-conv generator shape)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.errors import ConfigError

if TYPE_CHECKING:
    from selfsup.ssl.backbone import Backbone

LOG2 = math.log(2.0)
BIN = 1.0 / 255.0
"""Half the width of one of the 256 bins after rescaling 8-bit values to [-1, 1]."""


def bits_per_dim(nll_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """A negative log-likelihood in nats per image -> bits per dimension (``num_dims = C * H * W``)."""
    return nll_nats / (num_dims * LOG2)


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images, or floats in [0, 1] (possibly resampled), -> the nearest int64 8-bit values."""
    if x.dtype == torch.uint8:
        return x.long()
    return (x.clamp(0, 1) * 255).round().long()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Mächler 2012)."""
    near = x > -LOG2
    # Each branch sees only inputs where it is accurate, so the unused one cannot feed inf/NaN into gradients.
    return torch.where(
        near, torch.log(-torch.expm1(torch.where(near, x, -1.0))), torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    )


def discretized_logistic_log_prob(values: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-probability of 8-bit values under a logistic discretised into 256 bins on [-1, 1] (PixelCNN++).

    Value ``v`` is the bin ``[c - 1/255, c + 1/255]`` around ``c = 2 v / 255 - 1``; the bins of 0 and 255
    extend to -inf and +inf, so the 256 probabilities sum to 1 exactly. ``log(sigmoid(a) - sigmoid(b))``
    is computed on whichever tail keeps both terms small, so it stays finite when a bin is far out in
    a tail or the scale is tiny (no fallback to the density at the bin centre).

    Args:
        values: int64 8-bit values.
        mean: logistic location on the [-1, 1] scale (broadcast against ``values``).
        log_scale: log of the logistic scale.

    Shape:
        - Input: ``values``, ``mean``, ``log_scale`` broadcastable to one shape -> Output: that shape (nats)
    """
    centre = values.to(mean.dtype) * (2 * BIN) - 1
    inv_s = torch.exp(-log_scale)
    upper = (centre + BIN - mean) * inv_s  # a: sigmoid(a) is the CDF at the bin's upper edge
    lower = (centre - BIN - mean) * inv_s  # b
    # sigmoid(a) - sigmoid(b) == sigmoid(-b) - sigmoid(-a): take the side where both are below 1/2.
    right = (upper + lower) > 0
    a = torch.where(right, -lower, upper)
    b = torch.where(right, -upper, lower)
    log_a, log_b = F.logsigmoid(a), F.logsigmoid(b)
    middle = log_a + _log1mexp(torch.clamp(log_b - log_a, max=-1e-12))
    first = F.logsigmoid(upper)  # value 0: everything below the upper edge
    last = F.logsigmoid(-lower)  # value 255: everything above the lower edge
    return torch.where(values == 0, first, torch.where(values == 255, last, middle))


def logistic_mixture_log_prob(values: torch.Tensor, params: torch.Tensor, components: int) -> torch.Tensor:
    """Log-probability of 8-bit images under a per-subpixel mixture of ``components`` discretised logistics.

    ``params`` holds, per subpixel, ``components`` mixture logits, means and log-scales, channel-major:
    channel ``3 * K * c + k`` is the logit of component ``k`` of colour channel ``c`` (then means, then
    log-scales). With one component this is the plain discretised logistic. Colour channels are
    independent given ``params`` (no PixelCNN++ channel autoregression: a VAE decoder is factorised).

    Shape:
        - Input: ``values (B, C, H, W)`` int64, ``params (B, 3*K*C, H, W)``
        - Output: ``(B, C, H, W)`` log-probabilities in nats
    """
    b, c, h, w = values.shape
    p = params.view(b, c, 3, components, h, w)  # (B, 3KC, H, W) -> (B, C, 3, K, H, W)
    logits, mean, log_scale = p.unbind(2)  # each (B, C, K, H, W)
    log_scale = log_scale.clamp(min=-7.0)  # scale >= 1e-3, far below one bin (2/255): no density spikes
    per = discretized_logistic_log_prob(values[:, :, None], mean, log_scale)  # (B, C, K, H, W)
    return torch.logsumexp(per + F.log_softmax(logits, dim=2), dim=2)  # (B, C, H, W)


def logistic_mixture_mean(params: torch.Tensor, channels: int, components: int) -> torch.Tensor:
    """The expected image in [0, 1] of :func:`logistic_mixture_log_prob`'s mixture (what sample grids show).

    Shape:
        - Input: ``(B, 3*K*C, H, W)`` -> Output: ``(B, C, H, W)``
    """
    b, _, h, w = params.shape
    p = params.view(b, channels, 3, components, h, w)  # (B, C, 3, K, H, W)
    mean = (F.softmax(p[:, :, 0], dim=2) * p[:, :, 1].clamp(-1, 1)).sum(2)  # (B, C, H, W) in [-1, 1]
    return (mean + 1) / 2


def bernoulli_log_prob(bits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Log-probability of binary pixels under independent Bernoullis with ``logits``.

    Shape:
        - Input: ``bits`` and ``logits`` of one shape -> Output: that shape (nats)
    """
    return -F.binary_cross_entropy_with_logits(logits, bits.to(logits.dtype), reduction="none")


def upsampling_stages(image_size: int, base: int = 4) -> tuple[int, int]:
    """``(start, n)``: a ``start`` x ``start`` map doubled ``n`` times gives ``image_size`` (32 -> (4, 3)).

    Halves ``image_size`` while it is even and above ``base``, so odd sizes start at full size.
    """
    if image_size < 1:
        raise ConfigError(f"image_size must be positive, got {image_size!r}")
    start, n = image_size, 0
    while start > base and start % 2 == 0:
        start, n = start // 2, n + 1
    return start, n


class ConvDecoder(nn.Module):
    """Latent vector -> image parameters: a linear map to a small map, then stride-2 transposed convs (DCGAN).

    Widths halve at every doubling, from ``width * 2**(n-1)`` down to ``width``; a final 3x3 conv gives
    ``out_chans`` channels (likelihood parameters, or pixels for a generator).

    Args:
        latent_dim: size of the latent vector.
        out_chans: output channels.
        image_size: output side.
        width: channels of the last (full-resolution) stage.

    Shape:
        - Input: ``(B, latent_dim)`` -> Output: ``(B, out_chans, image_size, image_size)``
    """

    def __init__(self, latent_dim: int, out_chans: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"decoder width must be positive, got {width!r}")
        start, n = upsampling_stages(image_size)
        widths = [width * 2 ** max(n - 1 - i, 0) for i in range(n + 1)]  # 32 px, width 64: 256, 128, 64, 64
        self.start, self.first = start, widths[0]
        self.project = nn.Sequential(
            nn.Linear(latent_dim, widths[0] * start * start), nn.BatchNorm1d(widths[0] * start * start), nn.ReLU()
        )
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.up = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, out_chans, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], self.first, self.start, self.start)  # (B, W*s*s) -> (B, W, s, s)
        return self.out(self.up(x))


def sample_dir(trainer) -> Path | None:
    """``<run dir>/samples`` of a Lightning trainer (its ``default_root_dir``), or None without one."""
    root = getattr(trainer, "default_root_dir", None) if trainer is not None else None
    return None if root is None else Path(root) / "samples"


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write images in [0, 1] as one PNG grid (``torchvision.utils.save_image``), creating the folder.

    Shape:
        - Input: ``(N, C, H, W)`` floats in [0, 1]
    """
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().clamp(0, 1).cpu(), str(path), nrow=nrow, padding=1)
    return path


LIKELIHOODS = ("logistic", "bernoulli")


class PixelLikelihood(nn.Module):
    """A factorised likelihood of 8-bit images given per-pixel parameters from a decoder.

    ``logistic``: a (mixture of) discretised logistic(s) over the 256 values of every subpixel; its
    negative log-likelihood in bits/dim is comparable to published 8-bit numbers. ``bernoulli``: the
    images binarised at 1/2 (an 8-bit value >= 128 is 1), for binary-like data such as digits; its
    bits/dim are those of the binarised images, not comparable to 8-bit numbers.

    Args:
        kind: ``logistic`` or ``bernoulli``.
        channels: image channels.
        components: logistic mixture components (1: a single discretised logistic).

    Shape:
        - log_prob: images ``(B, C, H, W)`` (uint8 or [0, 1]), params ``(B, param_channels, H, W)`` -> ``(B,)`` nats
        - mean: params -> ``(B, C, H, W)`` in [0, 1]
    """

    def __init__(self, kind: str = "logistic", channels: int = 3, components: int = 1) -> None:
        super().__init__()
        if kind not in LIKELIHOODS:
            raise ConfigError(f"likelihood must be one of {LIKELIHOODS}, got {kind!r}")
        if components < 1:
            raise ConfigError(f"logistic_components must be >= 1, got {components!r}")
        self.kind, self.channels, self.components = kind, channels, components
        self.param_channels = channels * (3 * components if kind == "logistic" else 1)

    def log_prob(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        values = to_8bit(images)
        if self.kind == "logistic":
            per = logistic_mixture_log_prob(values, params, self.components)
        else:
            per = bernoulli_log_prob(values >= 128, params)
        return per.flatten(1).sum(1)  # (B, C, H, W) -> (B,)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        if self.kind == "logistic":
            return logistic_mixture_mean(params, self.channels, self.components)
        return torch.sigmoid(params)


class PosteriorMeanEncoder(nn.Module):
    """RGB images in [0, 1] (or uint8) -> normalised -> backbone -> posterior mean of z (the exported encoder).

    Shape:
        - Input: ``(B, 3, H, W)`` -> Output: ``(B, latent_dim)``
    """

    def __init__(self, backbone: Backbone, normalize: nn.Module, posterior: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.normalize, self.posterior = backbone, normalize, posterior
        self.num_features = posterior.out_features // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(self.backbone(self.normalize(x)))[:, : self.num_features]
