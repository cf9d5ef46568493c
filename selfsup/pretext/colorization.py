"""Colorization: predict an image's colours (CIE ab) from its lightness (L).

The backbone sees L only; a light decoder upsamples its feature map and predicts, per pixel at a
quarter of the input resolution, a distribution over the quantised in-gamut ab bins
(:mod:`selfsup.pretext.lab`), trained with soft-encoded targets and class rebalancing; ``colorize``
decodes it with the annealed mean. ``loss="l2"`` is the regression baseline the paper compares with.

- [0] Colorful Image Colorization, Zhang et al. 2016, https://arxiv.org/abs/1603.08511
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from kornia.color import lab_to_rgb, rgb_to_lab
from torch import nn

from selfsup.data.transforms import to_float
from selfsup.errors import ConfigError
from selfsup.pretext.lab import (
    annealed_mean,
    gamut_bins,
    rebalance_weights,
    rebalanced_cross_entropy,
    smooth_prior,
    soft_encode,
)
from selfsup.pretext.task import Task, TaskMethod, register_task
from selfsup.ssl.module import register_method

LOSSES = ("ce", "l2")
AB_SCALE = 100.0
"""The regression head predicts ab / AB_SCALE, so its targets are of order one."""


class ColorDecoder(nn.Module):
    """Feature map -> 1x1 conv -> bilinear upsampling -> 3x3 conv -> 1x1 conv to ``out_channels``.

    Shape:
        - Input: ``(B, C, h, w)`` and an output ``size`` ``(H', W')`` -> ``(B, out_channels, H', W')``
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 64) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.refine = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h = F.interpolate(self.reduce(fmap), size=size, mode="bilinear", align_corners=False)
        return self.out(self.refine(h))


@register_task("colorization")
class ColorizationTask(Task):
    """Colours from lightness on a shared lightness-only backbone.

    The empirical prior over ab bins is a running mean of the per-batch histograms of the training
    targets' nearest bins, over every training batch seen (a persistent buffer, so it is saved in
    checkpoints and resumed); the rebalancing weights use it smoothed by a Gaussian (sigma 5).

    Args: see :class:`Colorization`.
    """

    in_chans = 1

    def __init__(
        self,
        num_features: int,
        in_chans: int = 1,
        *,
        loss: str = "ce",
        decoder_width: int = 64,
        out_stride: int = 4,
        rebalance: float = 0.5,
        temperature: float = 0.38,
    ) -> None:
        super().__init__()
        if in_chans != 1:
            raise ConfigError(f"colorization needs a lightness-only backbone (in_chans=1), got in_chans={in_chans!r}")
        if loss not in LOSSES:
            raise ConfigError(f"colorization loss must be one of {LOSSES}, got {loss!r}")
        if out_stride < 1 or decoder_width < 1:
            raise ConfigError(f"out_stride and decoder_width must be >= 1, got {out_stride!r} and {decoder_width!r}")
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {temperature!r}")
        if not 0 < rebalance <= 1:
            raise ConfigError(f"rebalance (the paper's lambda) must be in (0, 1], got {rebalance!r}")
        self.loss_kind, self.out_stride, self.rebalance, self.temperature = loss, out_stride, rebalance, temperature
        bins = gamut_bins()
        self.register_buffer("bins", bins, persistent=False)  # recomputed, never loaded
        self.register_buffer("prior", torch.zeros(len(bins)))
        self.register_buffer("prior_batches", torch.zeros(()))
        self.decoder = ColorDecoder(num_features, len(bins) if loss == "ce" else 2, decoder_width)

    def predict(self, x: torch.Tensor, backbone: nn.Module, prepare: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder output (bin logits, or ab / AB_SCALE for ``l2``) at 1/``out_stride`` resolution, and pooled features.

        Shape:
            - x: ``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, Q or 2, H / s, W / s)`` and ``(B, D)``
        """
        fmap = backbone.forward_features(prepare(x))  # (B, C, h, w)
        if fmap.ndim != 4 or fmap.shape[1] != self.decoder.reduce[0].in_channels:
            raise ConfigError(f"colorization needs a (B, {self.decoder.reduce[0].in_channels}, h, w) feature map, got {tuple(fmap.shape)}")
        size = (max(1, x.shape[-2] // self.out_stride), max(1, x.shape[-1] // self.out_stride))
        return self.decoder(fmap, size), backbone.pool(fmap)

    @torch.no_grad()
    def _update_prior(self, nearest: torch.Tensor) -> None:
        hist = torch.bincount(nearest, minlength=self.prior.shape[0]).float() / nearest.numel()  # (Q,)
        if dist.is_available() and dist.is_initialized():  # every rank keeps the same, global prior
            dist.all_reduce(hist)
            hist /= dist.get_world_size()
        self.prior_batches += 1
        self.prior += (hist - self.prior) / self.prior_batches

    def forward(self, x, backbone, prepare):
        out, feats = self.predict(x, backbone, prepare)
        ab = F.adaptive_avg_pool2d(rgb_to_lab(x)[:, 1:], out.shape[-2:])  # (B, 2, H/s, W/s) targets
        if self.loss_kind == "l2":
            return {"loss": F.mse_loss(out, ab / AB_SCALE), "features": feats.detach()}
        q = out.shape[1]
        logits = out.permute(0, 2, 3, 1).reshape(-1, q)  # (B, Q, h, w) -> (N, Q)
        idx, target = soft_encode(ab.permute(0, 2, 3, 1).reshape(-1, 2), self.bins)  # (N, 5) each
        nearest = idx[:, 0]
        if self.training:
            self._update_prior(nearest)
        with torch.no_grad():
            weights = rebalance_weights(smooth_prior(self.prior, self.bins), self.rebalance)[nearest]  # (N,)
        loss = rebalanced_cross_entropy(logits, idx, target, weights)
        acc = (logits.argmax(1) == nearest).float().mean()
        return {"loss": loss, "colorization_acc": acc, "features": feats.detach()}

    @torch.no_grad()
    def colorize(self, images: torch.Tensor, backbone: nn.Module, prepare: nn.Module) -> torch.Tensor:
        """RGB images -> their colourised lightness: predicted ab (annealed mean), upsampled, with the input's L.

        Shape:
            - images: ``(B, 3, H, W)`` in [0, 1] or uint8 -> ``(B, 3, H, W)`` RGB in [0, 1]
        """
        x = to_float(images)
        out, _ = self.predict(x, backbone, prepare)
        if self.loss_kind == "l2":
            ab = out * AB_SCALE
        else:  # (B, Q, h, w) -> (B, h, w, Q) -> (B, h, w, 2) -> (B, 2, h, w)
            ab = annealed_mean(out.permute(0, 2, 3, 1), self.bins, self.temperature).permute(0, 3, 1, 2)
        ab = F.interpolate(ab, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([rgb_to_lab(x)[:, :1], ab], 1), clip=True)


ROW_LABELS = ("input (L)", "predicted", "truth")


def colorization_grid(images: torch.Tensor, colorized: torch.Tensor, path: str | Path, min_size: int = 64) -> Path:
    """Write a PNG of three labelled rows: the grey input, the colourised prediction, the truth.

    Shape:
        - images, colorized: ``(B, 3, H, W)`` RGB in [0, 1]
    """
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    truth = to_float(images)
    lab = rgb_to_lab(truth)
    grey = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], 1))
    rows = torch.cat([grey, colorized, truth]).float().cpu()  # (3B, 3, H, W)
    if rows.shape[-1] < min_size:  # tiny images (CIFAR's 32 px) upscaled to be visible, pixels kept sharp
        rows = F.interpolate(rows, scale_factor=-(-min_size // rows.shape[-1]), mode="nearest")
    grid = make_grid(rows.clamp(0, 1), nrow=len(images), padding=2, pad_value=1.0)  # (3, H', W')
    picture = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    tile = rows.shape[-2] + 2
    font = ImageFont.load_default(size=max(11, min(tile // 5, 18)))
    margin = 10 + int(max(ImageDraw.Draw(picture).textlength(label, font=font) for label in ROW_LABELS))
    canvas = Image.new("RGB", (margin + picture.width, picture.height), "white")
    canvas.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(ROW_LABELS):  # each row's name, left of it, vertically centred
        draw.text((5, 2 + r * tile + tile // 2), label, fill="black", font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def pick_across_classes(picked: list, images: torch.Tensor, labels: torch.Tensor, n: int) -> list[int]:
    """Add to ``picked`` (``(label, image)`` pairs) images of classes it lacks, up to ``n`` pairs; their indices.

    Validation data is often ordered by class, so a grid of the first ``n`` images would show one class;
    this takes the first image of each new class, batch after batch.
    """
    seen = {label for label, _ in picked}
    taken = []
    for i, label in enumerate(labels.tolist()):
        if len(picked) >= n:
            break
        if label not in seen:
            seen.add(label)
            picked.append((label, images[i].clone()))
            taken.append(i)
    return taken


@register_method("colorization")
class Colorization(TaskMethod):
    """Colorization as a pretext task (Zhang et al. 2016): the backbone sees L, a decoder predicts ab.

    At the end of each validation epoch a grid of validation images, one per class where the data has
    enough classes (rows labelled grey input, prediction, truth), is written to
    ``<run dir>/colorization/epoch_XXX.png``.

    Args:
        loss: ``ce``: classification over the in-gamut ab bins with soft targets and class rebalancing;
            ``l2``: regression of ab with a mean squared error.
        decoder_width: channels of the decoder.
        out_stride: the decoder predicts at 1/``out_stride`` of the input resolution (the paper's 4).
        rebalance: the rebalancing lambda mixing the empirical prior with a uniform one (1: no rebalancing).
        temperature: annealed-mean temperature of ``colorize`` (0.38 in the paper).
        grid_images: validation images in the PNG grid; 0 turns it off.
    """

    base_defaults = {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05}

    def __init__(
        self,
        *,
        loss: str = "ce",
        decoder_width: int = 64,
        out_stride: int = 4,
        rebalance: float = 0.5,
        temperature: float = 0.38,
        grid_images: int = 8,
        **base,
    ) -> None:
        super().__init__(**(self.base_defaults | base), in_chans=1)
        self.task = ColorizationTask(
            self.num_features, self.backbone.in_chans, loss=loss, decoder_width=decoder_width,
            out_stride=out_stride, rebalance=rebalance, temperature=temperature,
        )
        self._grid_batch: torch.Tensor | None = None
        self._grid_picks: list[tuple[int, torch.Tensor]] = []  # one validation image per class, for the grid


    @torch.no_grad()
    def colorize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images ``(B, 3, H, W)`` in [0, 1] or uint8 -> colourised from their lightness, RGB in [0, 1]."""
        was_training = self.training
        self.eval()
        try:
            return self.task.colorize(images, self.backbone, self.normalize)
        finally:
            self.train(was_training)

    def validation_step(self, batch, batch_idx: int):
        n = self.hparams.grid_images
        if n <= 0:
            return
        if batch_idx == 0:
            self._grid_picks = []
            taken = set(pick_across_classes(self._grid_picks, batch[0], batch[1], n))
            # the rest of the first batch fills the grid if the data has fewer than n classes
            self._grid_batch = batch[0][[i for i in range(len(batch[0])) if i not in taken][:n]].clone()
        elif len(self._grid_picks) < n:
            pick_across_classes(self._grid_picks, batch[0], batch[1], n)

    def on_validation_epoch_end(self) -> None:
        spare, self._grid_batch = self._grid_batch, None
        picks, self._grid_picks = self._grid_picks, []
        if spare is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        images = torch.stack([image for _, image in picks] + list(spare[: self.hparams.grid_images - len(picks)]))
        path = Path(self.trainer.default_root_dir) / "colorization" / f"epoch_{self.current_epoch:03d}.png"
        colorization_grid(images, self.colorize(images), path)
