"""Normalizing flow (RealNVP/Glow multi-scale): exact likelihood in bits/dim, samples, probe-able latents.

The flow maps a dequantised image bijectively to one latent per scale; its loss is the exact negative
log-likelihood in bits per dimension. The encoder a probe sees is the same flow, run on the image
(no noise, mid-bin dequantisation), each scale's latent pooled over space (mean and std per channel)
and concatenated.

- [0] Density estimation using Real NVP, Dinh et al. 2017, https://arxiv.org/abs/1605.08803
- [1] Glow: Generative Flow with Invertible 1x1 Convolutions, Kingma & Dhariwal 2018,
  https://arxiv.org/abs/1807.03039
- [2] Flow++ (variational dequantisation), Ho et al. 2019, https://arxiv.org/abs/1902.00275
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from selfsup.errors import ConfigError
from selfsup.ssl.generative.flow_layers import (  # noqa: F401  (re-exported: they lived here first)
    LEVELS,
    FlowEncoder,
    MultiScaleFlow,
    VariationalDequantizer,
    check_side,
    dequantize,
    pool_latents,
)
from selfsup.ssl.module import SSLModule, register_method


def bits_per_dim(log_density: torch.Tensor, dims: int) -> torch.Tensor:
    """Bits per dimension of 8-bit data from the log-density of its dequantised values in [-0.5, 0.5).

    The density of ``(level + u) / 256`` is ``256^D`` times that of ``level + u``, whose negative log
    bounds the discrete data's code length: ``(-log p + D log 256) / (D log 2)``.

    Shape:
        - Input: ``(B,)`` -> Output: ``(B,)``
    """
    return (-log_density + dims * math.log(LEVELS)) / (dims * math.log(2))


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """Write images ``(N, C, H, W)`` in [0, 1] as one PNG grid."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().cpu(), str(path), nrow=nrow, padding=1)
    return path


@register_method("flow")
class Flow(SSLModule):
    """Glow-style multi-scale normalizing flow trained by exact maximum likelihood (Kingma & Dhariwal 2018).

    Each level squeezes (space to channels), applies ``steps`` x (actnorm, LU-decomposed invertible
    1x1 convolution, affine coupling) and factors half of the channels out with a learned conditional
    prior. Uniform dequantisation by default, variational (a learned ``q(u | x)``, Ho et al. 2019) with
    ``dequantization="variational"``; loss and ``val/bits_per_dim`` are the negative log-likelihood
    bound in bits per dimension (exact for the dequantised density; on the held-out split every
    validation epoch). Each training epoch writes a grid
    of samples at ``sample_temperature`` to ``<run>/samples/epoch_XXX.png``.

    A flow has no trunk: its encoder is the flow itself, whose size ``levels``, ``steps`` and ``hidden``
    set. Evaluation features: every scale's latent, spatial mean and std per channel, concatenated.
    Training augmentation is horizontal flips only (random resized crops would interpolate pixels).

    Args:
        backbone: unused by a flow (its encoder is the flow itself); must stay ``convnet_small``, any
            other value is an error.
        levels: number of scales (image sides must be divisible by ``2 ** levels``).
        steps: flow steps (actnorm, 1x1 convolution, coupling) per level.
        hidden: channels of the coupling layers' convnets.
        dequantization: ``uniform`` (``u ~ U[0, 1)``) or ``variational`` (a learned logistic-normal
            ``q(u | x)``, :class:`~selfsup.ssl.generative.flow_layers.VariationalDequantizer`, trained
            with the flow on the tighter bound ``E_q[log p(x + u) - log q(u | x)]``).
        sample_temperature: temperature of the sample grid written each epoch (std of the latents
            relative to the prior's; 0 draws each prior's mean).
        num_samples: images in the sample grid (0: none).
    """

    uses_backbone = False
    validates = True  # val/bits_per_dim on the held-out split every epoch, with or without the probe
    base_defaults = {
        "backbone": "convnet_small", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "crop_scale": 1.0
    }

    def __init__(
        self,
        *,
        levels: int = 3,
        steps: int = 4,
        hidden: int = 32,
        dequantization: str = "uniform",
        sample_temperature: float = 0.7,
        num_samples: int = 64,
        **base,
    ) -> None:
        base = self.base_defaults | base
        if base["backbone"] != "convnet_small":
            raise ConfigError(
                "a flow has no backbone: its encoder is the flow itself (sized by --levels, --steps, --hidden); "
                f"leave --backbone at convnet_small, got {base['backbone']!r}"
            )
        if base.get("norm") is not None:
            raise ConfigError(f"a flow normalises with actnorm; --norm must stay None, got {base['norm']!r}")
        if base["crop_scale"] != 1.0:
            raise ConfigError(f"a flow models discrete pixels, so crop_scale must be 1.0, got {base['crop_scale']!r}")
        for name, v, lo in (("levels", levels, 1), ("steps", steps, 1), ("hidden", hidden, 1), ("num_samples", num_samples, 0)):
            if v < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {v!r}")
        if dequantization not in ("uniform", "variational"):
            raise ConfigError(f"dequantization must be 'uniform' or 'variational', got {dequantization!r}")
        if sample_temperature < 0:
            raise ConfigError(f"sample_temperature must be >= 0, got {sample_temperature!r}")
        super().__init__(**base)
        self.backbone = None  # SSLModule's default trunk: a flow has none, so it is not kept (nor saved)
        self.flow = MultiScaleFlow(3, levels, steps, hidden)
        self.dequantizer = VariationalDequantizer(3, hidden) if dequantization == "variational" else None
        self._side: int | None = None  # image side seen in training, for the sample grid

    @property
    def num_features(self) -> int:
        return 2 * sum(self.flow.latent_channels)

    def encoder(self) -> nn.Module:
        return FlowEncoder(self.flow)

    def bits_per_dim(self, images: torch.Tensor, noise: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-image bits/dim of uint8 images under the flow, and the latents.

        With ``noise``, the dequantisation noise is drawn (uniform, or from ``q(u | x)`` whose
        log-density is subtracted: the variational bound); without, every pixel sits at its bin's centre.

        Shape:
            - Input: ``(B, 3, H, W)`` -> ``(B,)`` and the list of latents
        """
        check_side(images, self.flow.levels)
        log_q = 0.0
        if noise and self.dequantizer is not None:
            u, log_q = self.dequantizer(dequantize(images, noise=False))
            y = dequantize(images, u=u)
        else:
            y = dequantize(images, noise)
        latents, logdet, log_prior = self.flow(y)
        return bits_per_dim(log_prior + logdet - log_q, images[0].numel()), latents

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        """Random horizontal flips per image in training (pixels are kept exactly, never interpolated)."""
        if not (self.training and self.hparams.flip):
            return x
        flip = torch.rand(x.shape[0], device=x.device) < 0.5  # (B,)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def loss(self, batch):
        x = self._flip(batch[0])
        self._side = x.shape[-1]
        bpd, latents = self.bits_per_dim(x)
        return {"loss": bpd.mean(), "features": pool_latents(latents).detach()}

    def validation_step(self, batch, batch_idx: int):
        bpd, _ = self.bits_per_dim(batch[0])
        self.log("val/bits_per_dim", bpd.mean(), on_epoch=True, sync_dist=True, batch_size=batch[0].shape[0])

    @torch.no_grad()
    def sample(self, n: int, size: int, temperature: float = 0.7, seed: int | None = None) -> torch.Tensor:
        """``n`` images ``(n, 3, size, size)`` in [0, 1] drawn at ``temperature`` (0: the mean image)."""
        gen = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        y = self.flow.sample(n, size, temperature, generator=gen)
        return torch.nan_to_num(y + 0.5).clamp(0, 1)

    def on_train_epoch_end(self) -> None:
        if not self.hparams.num_samples or self._side is None or not self.trainer.is_global_zero:
            return
        images = self.sample(self.hparams.num_samples, self._side, self.hparams.sample_temperature, seed=0)
        save_grid(images, Path(self.trainer.default_root_dir) / "samples" / f"epoch_{self.current_epoch:03d}.png")
