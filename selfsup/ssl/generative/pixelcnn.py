"""Gated PixelCNN: an autoregressive exact-likelihood model of 8-bit pixels whose hidden layers are the features.

``p(x) = prod_i p(x_i | x_<i)`` over the subpixels in raster order, red before green before blue within
a pixel [0]. Masked gated convolutions in two stacks compute every conditional in one pass [1]: a
*vertical* stack sees only the rows above (a ``(k//2 + 1) x k`` kernel, the first layer's output shifted
one row down by its padding), a *horizontal* stack sees the pixels to the left in the current row (a
``1 x (k//2 + 1)`` kernel) and receives the vertical stack through a 1x1 convolution: together they see
every earlier pixel, without the original PixelCNN's blind spot. Within the current pixel the horizontal
stack's features are split in three colour groups: a red feature sees none of the pixel's subpixels,
green sees red, blue sees red and green (mask A in the first layer, B after; channels masked as in [0]).
Each layer is gated, ``tanh(W_f * x) . sigmoid(W_g * x)``, with a residual connection on the horizontal
stack [1]. No normalisation layer: batch statistics would leak later pixels into earlier conditionals.

Each subpixel's conditional is a mixture of ``K`` discretised logistics over the 256 values (the
PixelCNN++ likelihood [2], :func:`~selfsup.ssl.generative.common.logistic_mixture_log_prob`, exact:
its 256 probabilities sum to 1). PixelCNN++'s network is not masked across colours, so it couples the
channels inside the likelihood (one mixture per pixel, the green mean linear in red, blue's in red and
green); here the network is masked across colours as in [0, 1], so each colour gets its own mixture
whose parameters are any function of the earlier colours, which covers that coupling. The loss and
``val/bits_per_dim`` (held-out split, every epoch) are the exact negative log-likelihood in bits per
subpixel, comparable to the published CIFAR-10 numbers: PixelCNN 3.14 [0], Gated PixelCNN 3.03 [1],
PixelCNN++ 2.92 [2].

Representation: the network itself. Its stages are the horizontal stack's output after each gated
layer (``layer1`` .. ``layerL``, each ``(B, hidden, H, W)``); the plain features are one stage averaged
over space, by default the middle one, where Chen et al. found an autoregressive model's best
linear-probe features [3]. The exported encoder exposes every stage in one pass for a layer-wise probe
(``forward_intermediates``, ``stage_channels``, ``stage_names``, as a DCGAN backbone's).

- [0] Pixel Recurrent Neural Networks (PixelCNN), van den Oord et al. 2016, https://arxiv.org/abs/1601.06759
- [1] Conditional Image Generation with PixelCNN Decoders (Gated PixelCNN), van den Oord et al. 2016,
  https://arxiv.org/abs/1606.05328
- [2] PixelCNN++, Salimans et al. 2017, https://arxiv.org/abs/1701.05517
- [3] Generative Pretraining from Pixels (iGPT), Chen et al. 2020, https://proceedings.mlr.press/v119/chen20s.html
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.errors import ConfigError
from selfsup.ssl.generative.common import PixelLikelihood, bits_per_dim, sample_dir, save_image_grid
from selfsup.ssl.generative.pixelcnn_net import (  # noqa: F401  (re-exported: they lived here first)
    COLOURS,
    GatedLayer,
    GatedPixelCNN,
    MaskedConv2d,
    PixelCNNEncoder,
    Symmetric,
    centre_mask,
    colour_groups,
    gate,
    symmetric,
)
from selfsup.ssl.module import SSLModule, register_method


def sample_logistic_mixture(params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One exact draw of 8-bit values from discretised logistic mixtures: a component, a logistic, its bin.

    A logistic draw ``x`` falls in value ``v``'s bin ``[c_v - 1/255, c_v + 1/255)`` exactly when
    ``round((x + 1) * 255 / 2) = v``; clamping gives the edge bins their tails.

    Shape:
        - Input: ``(N, 3, K)`` logits, means, log-scales of each mixture -> Output: ``(N,)`` int64 in [0, 255]
    """
    logits, mean, log_scale = params.unbind(1)  # (N, K) each
    k = torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator)  # (N, 1)
    mu, log_s = mean.gather(1, k)[:, 0], log_scale.gather(1, k)[:, 0].clamp(min=-7.0)  # the likelihood's floor
    u = torch.rand(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype).clamp(1e-6, 1 - 1e-6)
    x = mu + log_s.exp() * (torch.log(u) - torch.log1p(-u))
    return ((x + 1) * 127.5).round().clamp(0, 255).long()


@register_method("pixelcnn")
class PixelCNN(SSLModule):
    """Gated PixelCNN (van den Oord et al. 2016) with a discretised logistic mixture likelihood (Salimans et al. 2017).

    Trained by exact maximum likelihood; loss and ``val/bits_per_dim`` (held-out split, every epoch) in
    bits per subpixel. Each training epoch writes ``num_samples`` images drawn subpixel by subpixel to
    ``<run>/samples/epoch_XXX.png`` (``3 * H * W`` sequential passes of the horizontal stack; the time
    is printed). Training augmentation is horizontal flips only (a crop would interpolate pixels).

    A PixelCNN has no trunk: its encoder is the network, sized by ``layers``, ``hidden`` and ``kernel``;
    features are one layer's horizontal stack averaged over space, and the export exposes every layer.

    Args:
        backbone: unused by a PixelCNN (its encoder is the network itself); must stay ``convnet_small``,
            any other value is an error.
        layers: gated layers.
        hidden: channels of each stack (and of the features); at least 3, split in R, G, B groups.
        kernel: odd side of the gated layers' kernels (vertical ``(k//2+1) x k``, horizontal ``1 x (k//2+1)``).
        first_kernel: odd side of the first layer's kernel (the original PixelCNN's 7).
        logistic_components: discretised logistics in each subpixel's mixture (PixelCNN++ uses 10 per pixel).
        probe_layer: the layer whose pooled activations are the features, 1 .. layers; 0: the middle one,
            ``ceil(layers / 2)`` (Chen et al. 2020 found the middle layers best).
        num_samples: images in the sample grid written each epoch (0: none; sampling is sequential).
    """

    uses_backbone = False
    validates = True
    base_defaults = {
        "backbone": "convnet_small", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "crop_scale": 1.0,
    }

    def __init__(
        self,
        *,
        layers: int = 8,
        hidden: int = 64,
        kernel: int = 3,
        first_kernel: int = 7,
        logistic_components: int = 5,
        probe_layer: int = 0,
        num_samples: int = 8,
        **base,
    ) -> None:
        base = self.base_defaults | base
        if base["backbone"] != "convnet_small":
            raise ConfigError(
                "a PixelCNN has no backbone: its encoder is the network itself (sized by --layers, --hidden, "
                f"--kernel); leave --backbone at convnet_small, got {base['backbone']!r}"
            )
        if base.get("norm") is not None:
            raise ConfigError(f"a PixelCNN has no normalisation layer (batch statistics would leak later pixels); "
                              f"--norm must stay None, got {base['norm']!r}")
        if base["crop_scale"] != 1.0:
            raise ConfigError(f"a PixelCNN models discrete pixels, so crop_scale must be 1.0, got {base['crop_scale']!r}")
        for name, v, lo in (("layers", layers, 1), ("hidden", hidden, COLOURS), ("logistic_components",
                            logistic_components, 1), ("num_samples", num_samples, 0), ("probe_layer", probe_layer, 0)):
            if v < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {v!r}")
        for name, v in (("kernel", kernel), ("first_kernel", first_kernel)):
            if v < 3 or v % 2 == 0:
                raise ConfigError(f"{name} must be odd and >= 3, got {v!r}")
        if probe_layer > layers:
            raise ConfigError(f"probe_layer must be 0 (the middle) or 1 .. layers={layers}, got {probe_layer!r}")
        super().__init__(**base)
        self.backbone = None  # SSLModule's default trunk: a PixelCNN has none, so it is not kept (nor saved)
        self.net = GatedPixelCNN(layers, hidden, kernel, first_kernel, logistic_components)
        self.likelihood = PixelLikelihood("logistic", channels=COLOURS, components=logistic_components)
        self.probe_index = (probe_layer or (layers + 1) // 2) - 1  # 0-based
        self._side: tuple[int, int] | None = None  # image size seen in training, for the sample grid
        self._announced = False

    @property
    def num_features(self) -> int:
        return self.hparams.hidden

    def encoder(self) -> nn.Module:
        return PixelCNNEncoder(self.net, self.probe_index)

    def forward_params(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mixture parameters of every subpixel's conditional, and every stage.

        Shape:
            - Input: ``(B, 3, H, W)`` uint8 or [0, 1] -> ``(B, 9K, H, W)`` and ``layers`` maps ``(B, hidden, H, W)``
        """
        last, stages = self.net.forward_intermediates(symmetric(x, self.dtype))
        return self.net.head(last), stages

    def bits_per_dim(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Exact per-image negative log-likelihood in bits per subpixel, and every stage.

        Shape:
            - Input: ``(B, 3, H, W)`` uint8 or [0, 1] -> ``(B,)`` and the stages
        """
        if images.shape[1] != COLOURS:
            raise ConfigError(f"a PixelCNN models RGB images, got {images.shape[1]} channel(s)")
        params, stages = self.forward_params(images)
        return bits_per_dim(-self.likelihood.log_prob(images, params), images[0].numel()), stages

    def loss(self, batch):
        x = self.augment(batch[0])  # [0, 1], flipped in training; pixels kept exactly
        self._side = tuple(x.shape[-2:])
        bpd, stages = self.bits_per_dim(x)
        return {"loss": bpd.mean(), "features": stages[self.probe_index].mean(dim=(2, 3)).detach()}

    def validation_step(self, batch, batch_idx: int):
        bpd, _ = self.bits_per_dim(batch[0])
        self.log("val/bits_per_dim", bpd.mean(), on_epoch=True, sync_dist=True, prog_bar=True,
                 batch_size=batch[0].shape[0])

    @torch.no_grad()
    def sample(self, n: int, size: tuple[int, int], seed: int | None = None) -> torch.Tensor:
        """``n`` images drawn exactly from the model, one subpixel at a time (``3 * H * W`` sequential passes).

        Per row, the vertical stack runs once on the rows the row's conditionals depend on (``rows_seen``
        above it); per subpixel, only the horizontal stack and the head run, on that row's columns up to
        the current one. Every conditional is the full network's (tested).

        Shape:
            - Output: ``(n, 3, H, W)`` in [0, 1]
        """
        threads = torch.get_num_threads()
        if self.device.type == "cpu":  # thousands of tiny ops: intra-op threads only add waits at their barriers
            torch.set_num_threads(1)
        try:
            return self._sample(n, size, seed)
        finally:
            torch.set_num_threads(threads)

    def _sample(self, n: int, size: tuple[int, int], seed: int | None) -> torch.Tensor:
        gen = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        h, w = size
        k = self.hparams.logistic_components
        values = torch.zeros(n, COLOURS, h, w, dtype=torch.uint8, device=self.device)
        for r in range(h):
            top = max(0, r - self.net.rows_seen)
            context = self.net.row_context(symmetric(values[:, :, top : r + 1], self.dtype))  # (n, 2h, 1, W) each
            for c in range(w):
                cut = [v[..., : c + 1] for v in context]
                for ch in range(COLOURS):
                    row = symmetric(values[:, :, r : r + 1, : c + 1], self.dtype)  # (n, 3, 1, c+1)
                    params = self.net.row_params(row, cut)[:, :, 0, c]  # (n, 9K)
                    mix = params.view(n, COLOURS, 3, k)[:, ch]  # (n, 9K) -> (n, 3, 3, K) -> (n, 3, K)
                    values[:, ch, r, c] = sample_logistic_mixture(mix, gen).to(torch.uint8)
        return values.float() / 255

    def on_train_epoch_end(self) -> None:
        out = sample_dir(self.trainer)
        if not self.hparams.num_samples or self._side is None or out is None or not self.trainer.is_global_zero:
            return
        start = time.perf_counter()
        images = self.sample(self.hparams.num_samples, self._side, seed=0)
        seconds = time.perf_counter() - start
        path = save_image_grid(images, out / f"epoch_{self.current_epoch:03d}.png", nrow=min(8, len(images)))
        if not self._announced:
            h, w = self._side
            print(f"pixelcnn: {len(images)} samples of {h}x{w} took {seconds:.1f} s ({COLOURS * h * w} sequential "
                  f"passes); a grid every epoch in {path.parent}")
            self._announced = True
