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
from torch.nn import functional as F

from selfsup.errors import ConfigError


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in 0..255 to float32 in [0, 1] (on the images' device).

    Shape:
        - images: ``(B, 3, H, W)`` uint8 -> ``(B, 3, H, W)`` float32
    """
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def make_augment(
    image_size: int,
    crop_scale: tuple[float, float] | None = (0.5, 1.0),
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
        crop_scale: range of the crop's area as a fraction of the image's; None: no crop (the loader
            made it, see :mod:`selfsup.data.geometry`).
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
    if crop_scale is not None and not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ConfigError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale!r}")
    if color_jitter < 0:
        raise ConfigError(f"color_jitter must be >= 0, got {color_jitter!r}")
    if not 0.0 <= grayscale_p <= 1.0:
        raise ConfigError(f"grayscale_p must be in [0, 1], got {grayscale_p!r}")
    ops: list[nn.Module] = []
    if crop_scale is not None:
        ops.append(K.RandomResizedCrop((image_size, image_size), scale=tuple(crop_scale)))
    if flip:
        ops.append(K.RandomHorizontalFlip())
    if color_jitter > 0:
        s = float(color_jitter)
        ops.append(K.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(s / 4, 0.5), p=0.8))
    if grayscale_p > 0:
        ops.append(K.RandomGrayscale(p=grayscale_p))
    return nn.Sequential(*ops)


class PatchAugment(nn.Module):
    """Per-patch colour dropping and horizontal flips, independent and batched over all patches (CPC v2).

    Colour dropping (Doersch et al. 2015) keeps one random channel of a patch and replaces the other two
    by Gaussian noise of std ``noise_std`` around 0, the dataset mean of normalised images (1/100 of a
    channel's std, as Doersch et al.), so a patch's colour cannot be matched across patches. One-channel
    (lightness) patches have no colour to drop: they are only flipped.

    Args:
        color_drop: probability that a patch has two of its three channels dropped.
        flip: probability that a patch is flipped horizontally.
        noise_std: std of the noise replacing the dropped channels, in normalised units.

    Shape:
        - Input: ``(N, C, p, p)`` normalised patches, ``C`` 3 or 1 -> Output: same shape
    """

    def __init__(self, color_drop: float = 1.0, flip: float = 0.5, noise_std: float = 0.01) -> None:
        super().__init__()
        for name, v in (("patch_color_drop", color_drop), ("patch_flip", flip)):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {v!r}")
        self.color_drop, self.flip, self.noise_std = color_drop, flip, noise_std

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        n, c, dev = patches.shape[0], patches.shape[1], patches.device
        if self.color_drop > 0 and c > 1:
            keep = F.one_hot(torch.randint(0, c, (n,), device=dev), c).to(patches.dtype)  # (N, C)
            drop = torch.rand(n, device=dev) < self.color_drop  # (N,)
            mask = torch.where(drop[:, None], keep, torch.ones_like(keep))[:, :, None, None]  # (N, C, 1, 1)
            patches = patches * mask + (1 - mask) * self.noise_std * torch.randn_like(patches)
        if self.flip > 0:
            flip = torch.rand(n, device=dev) < self.flip  # (N,)
            patches = torch.where(flip[:, None, None, None], patches.flip(-1), patches)
        return patches
