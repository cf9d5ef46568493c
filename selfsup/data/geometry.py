"""Where a view comes from in an image: random-resized crops for training, centre crops for evaluation.

One code path places every view: a :class:`TrainCrop` or :class:`EvalCrop` turns an image's size (read
from its header, before any pixel is decoded) into a :class:`Box` in the original image's pixels, and
:func:`crop_resize` cuts that box out of the decoded pixels and resizes it once to the output size
(torch, uint8, antialiased). Decoders may decode at a reduced scale first (JPEG DCT scaling) when the
box still has at least the output's pixels at that scale: :func:`reduction` says by how much.

- Training: the random-resized crop of Inception / SimCLR / MoCo (area fraction in ``scale`` of the
  *whole* image, aspect ratio log-uniform in ``ratio``), as torchvision's ``RandomResizedCrop`` samples it.
  [0] Szegedy et al., Going deeper with convolutions, 2015, https://arxiv.org/abs/1409.4842
- Evaluation: resize the shorter side to ``size / crop_pct`` and take the centre ``size`` square
  (``crop_pct = 0.875``: 256 then 224, the linear-evaluation protocol of timm and the SSL papers).

The random draws of sample ``i`` in epoch ``e`` come from :func:`draw_rng` ``(seed, e, i)`` alone, so a
view does not depend on which worker or device decodes it, and a resumed run sees the same crops.

>>> box = EvalCrop(224).box(375, 500)
>>> box.height, box.width, box.top, box.left
(328, 328, 24, 86)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.errors import ConfigError

DEFAULT_CROP_PCT = 0.875
"""Evaluation crops take the centre ``crop_pct`` of the shorter side (256 -> 224)."""

RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""Aspect-ratio range of the random-resized crop (width / height), as in every paper using it."""


@dataclass(frozen=True)
class Box:
    """A rectangle of an image in whole pixels: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int

    def scaled(self, factor_y: float, factor_x: float, max_h: int, max_w: int) -> Box:
        """The same region in an image scaled by ``(factor_y, factor_x)`` (a reduced-scale decode)."""
        top, left = int(self.top * factor_y), int(self.left * factor_x)
        bottom = min(max_h, max(top + 1, math.ceil((self.top + self.height) * factor_y)))
        right = min(max_w, max(left + 1, math.ceil((self.left + self.width) * factor_x)))
        return Box(top, left, bottom - top, right - left)


def draw_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of sample ``index`` in ``epoch``: a pure function of the three numbers."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


@dataclass(frozen=True)
class TrainCrop:
    """Random-resized crop of the whole image to ``size`` x ``size``.

    Args:
        size: output side.
        scale: range of the crop's area as a fraction of the image's area.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = RATIO

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"crop size must be positive, got {self.size!r}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale!r}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio!r}")

    @staticmethod
    def for_method(size: int, crop_scale: float) -> TrainCrop:
        """A method's crop: area in ``[crop_scale, 1]``; ``crop_scale = 1`` is the centred largest square."""
        return TrainCrop(size, (crop_scale, 1.0), RATIO if crop_scale < 1 else (1.0, 1.0))

    def box(self, height: int, width: int, rng: np.random.Generator) -> Box:
        """Sample a box of a ``height`` x ``width`` image, as torchvision's ``RandomResizedCrop`` does.

        Ten tries of (area, log-aspect); when none fits, the whole image clamped to the ratio range.
        """
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return Box(top, left, h, w)
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        h, w = max(1, min(h, height)), max(1, min(w, width))
        return Box((height - h) // 2, (width - w) // 2, h, w)


@dataclass(frozen=True)
class EvalCrop:
    """Shorter side to ``size / crop_pct``, centre ``size`` square: the box is the centre square of side
    ``crop_pct`` x the shorter side.

    Args:
        size: output side.
        crop_pct: fraction of the shorter side the crop keeps (1.0: the largest centred square).
    """

    size: int
    crop_pct: float = DEFAULT_CROP_PCT

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"crop size must be positive, got {self.size!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")

    def box(self, height: int, width: int, rng: np.random.Generator | None = None) -> Box:
        """The centred square (same rounding as torchvision's ``Resize`` + ``CenterCrop``)."""
        short = min(height, width)
        side = max(1, min(short, int(round(short * self.crop_pct))))
        return Box(int(round((height - side) / 2.0)), int(round((width - side) / 2.0)), side, side)


@dataclass(frozen=True)
class WholeImage:
    """The whole image resized to ``size`` x ``size`` (the small-image cache: no pixel is discarded;
    a non-square image's aspect ratio is not kept)."""

    size: int

    def box(self, height: int, width: int, rng: np.random.Generator | None = None) -> Box:
        return Box(0, 0, height, width)


Placement = TrainCrop | EvalCrop | WholeImage


def reduction(box: Box, size: int, allowed: tuple[int, ...] = (8, 4, 2)) -> int:
    """The largest DCT reduction (8, 4 or 2; 1 for none) at which ``box`` still has ``size`` pixels a side."""
    for r in allowed:
        if box.height // r >= size and box.width // r >= size:
            return r
    return 1


def resize_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 images to ``size`` x ``size``, uint8 out.

    CPU tensors use torch's uint8 kernel (no float copy); other devices go through float32.

    Shape:
        - image: ``(3, H, W)`` or ``(B, 3, H, W)`` uint8 -> same leading shape, ``(size, size)`` last
    """
    if tuple(image.shape[-2:]) == (size, size):
        return image
    batched = image.ndim == 4
    x = image if batched else image[None]
    if x.device.type == "cpu":
        out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if batched else out[0]


def crop_resize(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """Cut ``box`` out of ``image`` and resize it to ``size`` x ``size`` (once).

    ``image`` may be channels-first or a channels-last view (``hwc.permute(2, 0, 1)``, as decoders give):
    torch's uint8 antialiased kernel is fastest on channels-last memory, so that layout is kept.

    Shape:
        - image: ``(3, H, W)`` uint8 -> ``(3, size, size)`` uint8, contiguous
    """
    patch = image[:, box.top : box.top + box.height, box.left : box.left + box.width]
    if patch.stride(0) == 1:  # channels-last memory
        patch = patch.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # (h, w, 3) -> (3, h, w) view
    else:
        patch = patch.contiguous()
    return resize_uint8(patch, size).contiguous()
