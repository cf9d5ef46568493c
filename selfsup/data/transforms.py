"""Batched, on-device augmentations (kornia): every sample in a batch gets its own random parameters.

The data pipeline only yields uint8 images; methods turn a batch into floats in [0, 1] and augment it
here, on the GPU when there is one, so decoding is never repeated and augmentation is never the
bottleneck.

>>> aug = make_augment(32, color_jitter=0.4, grayscale_p=0.2)
>>> aug(torch.rand(8, 3, 40, 40)).shape
torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from selfsup.errors import ConfigError


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in 0..255 to float32 in [0, 1] (on the images' device).

    Shape:
        - images: ``(B, 3, H, W)`` uint8 -> ``(B, 3, H, W)`` float32
    """
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def make_augment(
    image_size: int,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    flip: bool = True,
    color_jitter: float = 0.0,
    grayscale_p: float = 0.0,
) -> nn.Module:
    """Random resized crop, horizontal flip, colour jitter and grayscale, batched with per-sample parameters.

    Colour jitter of strength ``s`` changes brightness, contrast and saturation by up to ``s`` and hue by
    up to ``s / 4``, applied with probability 0.8: ``s = 0.4`` is MoCo v2's setting and ``s = 0.8`` SimCLR's.

    - [0] SimCLR, 2020, https://arxiv.org/abs/2002.05709
    - [1] MoCo v2, 2020, https://arxiv.org/abs/2003.04297

    Args:
        image_size: side of the square output.
        crop_scale: range of the crop's area as a fraction of the image's.
        flip: random horizontal flip with probability 0.5.
        color_jitter: strength ``s`` of the colour jitter; 0 disables it.
        grayscale_p: probability of converting a sample to grayscale.

    Returns:
        A module mapping float images in [0, 1] to augmented float images in [0, 1].

    Shape:
        - input: ``(B, 3, H, W)`` float
        - output: ``(B, 3, image_size, image_size)`` float
    """
    if image_size < 1:
        raise ConfigError(f"image_size must be positive, got {image_size!r}")
    lo, hi = crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale!r}")
    if color_jitter < 0:
        raise ConfigError(f"color_jitter must be >= 0, got {color_jitter!r}")
    if not 0.0 <= grayscale_p <= 1.0:
        raise ConfigError(f"grayscale_p must be in [0, 1], got {grayscale_p!r}")
    ops: list[nn.Module] = [K.RandomResizedCrop((image_size, image_size), scale=(lo, hi))]
    if flip:
        ops.append(K.RandomHorizontalFlip())
    if color_jitter > 0:
        s = float(color_jitter)
        ops.append(K.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(s / 4, 0.5), p=0.8))
    if grayscale_p > 0:
        ops.append(K.RandomGrayscale(p=grayscale_p))
    return nn.Sequential(*ops)
