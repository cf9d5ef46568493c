"""Invertible layers of a Glow/RealNVP multi-scale flow, each with its exact log-determinant.

Every layer maps ``x -> (y, log|det dy/dx|)`` with the log-determinant per sample ``(B,)``, and has an
``inverse(y) -> x``. :class:`MultiScaleFlow` stacks them: squeeze, ``steps`` x (actnorm, invertible
1x1 convolution, affine coupling) per level, and a split with a learned conditional prior between
levels. :class:`FlowEncoder` is the flow's exported encoder (every scale's latent, pooled).

- [0] Density estimation using Real NVP, Dinh et al. 2017, https://arxiv.org/abs/1605.08803
- [1] Glow: Generative Flow with Invertible 1x1 Convolutions, Kingma & Dhariwal 2018,
  https://arxiv.org/abs/1807.03039
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup.errors import ConfigError

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density summed over all but the batch dimension.

    Shape:
        - z, mean, log_std: ``(B, ...)`` (broadcastable) -> ``(B,)``
    """
    lp = -0.5 * (LOG_2PI + 2 * log_std + (z - mean) ** 2 * torch.exp(-2 * log_std))
    return lp.flatten(1).sum(1)


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + bias) * exp(log_scale)``, initialised from the first training batch.

    On its first forward in training mode the bias and scale are set so that the batch has zero mean and
    unit variance per channel (Glow, sec. 3.1); under DDP the statistics are averaged over ranks, so
    every rank starts identical. A persistent ``initialized`` buffer records that this happened, so a
    resumed or exported model never re-initialises; an uninitialised layer is the identity (in eval
    mode it stays so: the random-init twin of an encoder does not depend on data).

    Shape:
        - Input: ``(B, C, H, W)`` -> Output: same, and log-determinant ``(B,)``
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready: bool | None = None  # host copy of ``initialized``: one device sync per load, not per step

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = None

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
        sq = (x * x).mean(dim=(0, 2, 3), keepdim=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stats = torch.cat([mean, sq])  # (2, C, 1, 1)
            dist.all_reduce(stats)
            mean, sq = (stats / dist.get_world_size()).unbind(0)
            mean, sq = mean[None], sq[None]
        std = (sq - mean * mean).clamp_min(0).sqrt()
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._ready:
            self._ready = bool(self.initialized)
            if not self._ready and self.training:
                self._initialize(x)
                self._ready = True
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = self.log_scale.sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution with an LU-decomposed weight ``W = P L (U + diag(s))`` (Glow, sec. 3.2).

    ``W`` starts as a random rotation; ``P`` and the signs of ``s`` are fixed buffers, ``L`` (unit lower
    triangular), ``U`` (strictly upper) and ``log|s|`` are learned, so ``log|det W| = sum(log|s|)``
    costs O(C) instead of O(C^3).

    Shape:
        - Input: ``(B, C, H, W)`` -> Output: same, and log-determinant ``(B,)``
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> torch.Tensor:
        """The ``(C, C)`` matrix ``P L (U + diag(s))``."""
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[1]
        y = F.conv2d(x, self.weight().view(c, c, 1, 1))
        logdet = self.log_s.sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        c = y.shape[1]
        w_inv = torch.linalg.inv(self.weight().double()).to(y.dtype)
        return F.conv2d(y, w_inv.view(c, c, 1, 1))


class ZeroConv2d(nn.Conv2d):
    """3x3 convolution initialised to zero, so the layer it ends starts as the identity (Glow, sec. 3.3)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class AffineCoupling(nn.Module):
    """Affine coupling: the first half of the channels sets a scale and shift of the second half.

    ``y_b = (x_b + t(x_a)) * s(x_a)`` with ``s = sigmoid(r + 2) / sigmoid(2)``: Glow's stable sigmoid
    scale, divided by its value at 0 so that the zero-initialised last convolution makes the layer
    exactly the identity at initialisation (the scale stays in (0, 1.14), so it cannot blow up).

    Args:
        channels: input channels (split as ``C // 2`` conditioning, the rest transformed).
        hidden: width of the small convnet computing ``t`` and ``r`` (3x3, 1x1, zero-init 3x3).

    Shape:
        - Input: ``(B, C, H, W)`` -> Output: same, and log-determinant ``(B,)``
    """

    SHIFT = 2.0
    LOG_SIGMOID_SHIFT = -math.log1p(math.exp(-SHIFT))  # log sigmoid(2)

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.ca = channels // 2
        cb = channels - self.ca
        self.net = nn.Sequential(
            nn.Conv2d(self.ca, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(inplace=True),
            ZeroConv2d(hidden, 2 * cb),
        )

    def _shift_and_log_scale(self, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = self.net(xa).chunk(2, dim=1)  # (B, 2*cb, H, W) -> 2 x (B, cb, H, W)
        log_scale = F.logsigmoid(raw + self.SHIFT) - self.LOG_SIGMOID_SHIFT
        return shift, log_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa, xb = x[:, : self.ca], x[:, self.ca :]
        shift, log_scale = self._shift_and_log_scale(xa)
        yb = (xb + shift) * torch.exp(log_scale)
        return torch.cat([xa, yb], dim=1), log_scale.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        ya, yb = y[:, : self.ca], y[:, self.ca :]
        shift, log_scale = self._shift_and_log_scale(ya)
        return torch.cat([ya, yb * torch.exp(-log_scale) - shift], dim=1)


class FlowStep(nn.Sequential):
    """One Glow step: actnorm -> invertible 1x1 convolution -> affine coupling."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__(ActNorm(channels), InvConv1x1(channels), AffineCoupling(channels, hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self):
            y = layer.inverse(y)
        return y


class SplitPrior(nn.Module):
    """Gaussian prior of the half of the channels factored out at a scale, conditioned on the kept half.

    A zero-initialised convolution of the kept half gives the mean and log-std (Glow's ``split2d``),
    so at initialisation the prior is the standard normal.

    Shape:
        - Input: kept ``(B, Ck, H, W)`` -> mean, log_std ``(B, C - Ck, H, W)``
    """

    def __init__(self, kept: int, out: int) -> None:
        super().__init__()
        self.conv = ZeroConv2d(kept, 2 * out)

    def forward(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.conv(kept).chunk(2, dim=1)  # (B, 2*out, H, W) -> 2 x (B, out, H, W)
        return mean, log_std


class MultiScaleFlow(nn.Module):
    """Glow/RealNVP multi-scale architecture: ``levels`` x (squeeze, ``steps`` flow steps, split).

    At each level but the last, half of the channels is factored out as that scale's latent with a
    prior conditioned on the other half; the last level's latent has a standard normal prior. The map
    from an image to the list of latents is a bijection whose log-determinant is returned with it.

    Args:
        in_channels: image channels.
        levels: number of scales (the image side must be divisible by ``2 ** levels``).
        steps: flow steps per level.
        hidden: width of the coupling convnets.

    Shape:
        - forward: ``(B, C, H, W)`` -> latents ``[(B, 2^(2l+1) C, H/2^(l+1), W/2^(l+1)) for l < L-1]``
          and ``(B, 4^L C / 2^(L-1), H/2^L, W/2^L)`` last, log-det ``(B,)``, prior log-density ``(B,)``
    """

    def __init__(self, in_channels: int = 3, levels: int = 3, steps: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.levels = levels
        self.steps = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.latent_channels: list[int] = []
        c = in_channels
        for level in range(levels):
            c *= 4  # squeeze
            self.steps.append(nn.ModuleList(FlowStep(c, hidden) for _ in range(steps)))
            if level < levels - 1:
                kept = c // 2
                self.priors.append(SplitPrior(kept, c - kept))
                self.latent_channels.append(c - kept)
                c = kept
        self.latent_channels.append(c)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        log_prior = x.new_zeros(x.shape[0])
        latents = []
        for level, steps in enumerate(self.steps):
            x = F.pixel_unshuffle(x, 2)  # squeeze: (B, C, H, W) -> (B, 4C, H/2, W/2)
            for step in steps:
                x, ld = step(x)
                logdet = logdet + ld
            if level < self.levels - 1:
                kept = x.shape[1] // 2
                x, z = x[:, :kept], x[:, kept:]
                mean, log_std = self.priors[level](x)
                log_prior = log_prior + gaussian_log_prob(z, mean, log_std)
                latents.append(z)
        log_prior = log_prior + gaussian_log_prob(x, torch.zeros_like(x), torch.zeros_like(x))
        latents.append(x)
        return latents, logdet, log_prior

    def inverse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Images from the list of latents that :meth:`forward` returns."""
        x = latents[-1]
        for level in reversed(range(self.levels)):
            if level < self.levels - 1:
                x = torch.cat([x, latents[level]], dim=1)
            for step in reversed(self.steps[level]):
                x = step.inverse(x)
            x = F.pixel_shuffle(x, 2)  # unsqueeze: (B, 4C, h, w) -> (B, C, 2h, 2w)
        return x

    def sample(
        self, n: int, size: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``n`` images of side ``size``: every latent ``z ~ N(mean, (temperature * std)^2)``.

        Temperature 0 gives the mode of each prior, from the top scale down (the "mean image").

        Shape:
            - Output: ``(n, in_channels, size, size)`` in the flow's input space
        """
        p = next(self.parameters())
        kw = {"generator": generator, "device": p.device, "dtype": p.dtype}
        side = size // 2**self.levels
        x = temperature * torch.randn(n, self.latent_channels[-1], side, side, **kw)
        for level in reversed(range(self.levels)):
            if level < self.levels - 1:
                mean, log_std = self.priors[level](x)
                z = mean + temperature * torch.exp(log_std) * torch.randn(mean.shape, **kw)
                x = torch.cat([x, z], dim=1)
            for step in reversed(self.steps[level]):
                x = step.inverse(x)
            x = F.pixel_shuffle(x, 2)  # (B, 4C, h, w) -> (B, C, 2h, 2w)
        return x


class VariationalDequantizer(nn.Module):
    """``q(u | x)``: learned dequantisation noise in (0, 1) per pixel, conditioned on the image (Flow++).

    Uniform dequantisation trains the flow on ``x + u`` with ``u ~ U[0, 1)``, which spends likelihood on
    making the density flat inside every bin. With a learned ``q``, the bound

        ``log P(x) >= E_q[log p(x + u) - log q(u | x)]``

    is tighter (Ho et al. 2019). Here ``q`` is logistic-normal: ``u = sigmoid(mu + exp(s) * eps)``,
    ``eps ~ N(0, 1)``, with ``mu`` and ``s`` per pixel from a small convnet of the (mid-bin) image, so

        ``log q(u | x) = log N(eps) - s - log sigmoid(t) - log sigmoid(-t)``,  ``t = mu + exp(s) * eps``.

    Flow++ uses a conditional flow for ``q``; this is its one-layer member. The last convolution starts
    at ``mu = 0``, ``s = log 1.75`` for every image: ``sigmoid(N(0, 1.75^2))`` is the logistic-normal
    closest to uniform (``KL(q || U) = 0.01`` nats a dimension, against 0.19 at ``s = 0``), so the bound
    starts within 0.015 bits/dim of uniform dequantisation's and training can only tighten it.

    Args:
        channels: image channels.
        hidden: width of the convnet.

    Shape:
        - Input: ``(B, C, H, W)`` image in the flow's input space -> ``u`` of the same shape and
          ``log q(u | x)`` ``(B,)``
    """

    def __init__(self, channels: int = 3, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            ZeroConv2d(hidden, 2 * channels),
        )
        with torch.no_grad():
            self.net[-1].bias[channels:] = self.INIT_LOG_SCALE

    INIT_LOG_SCALE = math.log(1.75)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_scale = self.net(x).chunk(2, dim=1)  # 2 x (B, C, H, W)
        eps = torch.randn_like(mu) if eps is None else eps
        t = mu + torch.exp(log_scale) * eps
        log_q = -0.5 * (LOG_2PI + eps**2) - log_scale - F.logsigmoid(t) - F.logsigmoid(-t)
        return torch.sigmoid(t), log_q.flatten(1).sum(1)


LEVELS = 256  # 8-bit images


def dequantize(x: torch.Tensor, noise: bool = True, u: torch.Tensor | None = None) -> torch.Tensor:
    """Images -> continuous values in [-0.5, 0.5): ``(level + u) / 256 - 0.5`` (Theis et al. 2016).

    ``u`` when given (noise in [0, 1) per pixel, e.g. from a :class:`VariationalDequantizer`), else
    ``u ~ U[0, 1)`` per pixel when ``noise``, else ``u = 0.5`` (the bin's centre). uint8 images are
    the levels themselves; float images in [0, 1] are ``level / 255``.

    Shape:
        - Input: ``(B, C, H, W)`` uint8 or float -> Output: same shape, float32
    """
    levels = x.float() if x.dtype == torch.uint8 else x.float() * (LEVELS - 1)
    if u is None:
        u = torch.rand_like(levels) if noise else torch.full_like(levels, 0.5)
    return (levels + u) / LEVELS - 0.5


def pool_latents(latents: list[torch.Tensor]) -> torch.Tensor:
    """Per-channel spatial mean and std of every scale's latent, concatenated.

    Shape:
        - Input: ``[(B, C_l, H_l, W_l)]`` -> Output: ``(B, 2 * sum(C_l))``
    """
    feats = []
    for z in latents:
        std, mean = torch.std_mean(z, dim=(2, 3), correction=0)  # (B, C_l) each
        feats += [mean, std]
    return torch.cat(feats, dim=1)



def check_side(x: torch.Tensor, levels: int) -> None:
    """A ``ConfigError`` unless the image sides divide by ``2 ** levels`` (one squeeze per level)."""
    h, w = x.shape[-2:]
    if h % 2**levels or w % 2**levels:
        raise ConfigError(f"a flow with levels={levels} needs image sides divisible by {2**levels}, got {h}x{w}")


class FlowEncoder(nn.Module):
    """Evaluation encoder: RGB images in [0, 1] (or uint8) -> flow latents of every scale, pooled.

    Shape:
        - Input: ``(B, 3, H, W)`` with sides divisible by ``2 ** levels``
        - Output: ``(B, num_features)`` with ``num_features = 2 * sum(latent channels)``
    """

    def __init__(self, flow: MultiScaleFlow) -> None:
        super().__init__()
        self.flow = flow
        self.num_features = 2 * sum(flow.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_side(x, self.flow.levels)
        latents, _, _ = self.flow(dequantize(x, noise=False))
        return pool_latents(latents)
