"""CPC's patch grid and its exported encoder: plain ``nn.Module``s and functions, no Lightning.

The method (:mod:`selfsup.ssl.cpc`) trains on this grid; evaluation builds :class:`PatchEncoder` from an
export's hparams alone (:mod:`selfsup.ssl.encoders`), so probing a CPC encoder never imports Lightning.

- [0] Data-Efficient Image Recognition with Contrastive Predictive Coding (CPC v2), Hénaff et al. 2019,
  https://arxiv.org/abs/1905.09272
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.transforms import to_float
from selfsup.errors import ConfigError
from selfsup.ssl.backbone import Backbone


def default_patch_grid(image_size: int) -> tuple[int, int]:
    """Patch size and stride for a square image side: 32 -> (8, 4), 64..96 -> (16, 8), 224..256 -> (64, 32).

    Other sizes get ``patch = size // 4`` and ``stride = patch // 2`` (a 7x7 grid when the size divides
    by 8). The grid has ``(size - patch) // stride + 1`` patches a side (256 px: 7, 224 px: 6); pixels
    past the last patch on the right and bottom are unused.
    """
    if image_size == 32:
        return 8, 4
    if 64 <= image_size <= 96:
        return 16, 8
    if 224 <= image_size <= 256:
        return 64, 32
    patch = max(1, image_size // 4)
    return patch, max(1, patch // 2)


def fit_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (antialiased bilinear) and centre-crop; identity at that size.

    Shape:
        - Input: ``(B, C, H, W)`` float -> Output: ``(B, C, size, size)``
    """
    h, w = x.shape[-2:]
    if h == w == size:
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]


def patchify(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """Cut images into an overlapping grid of square patches, row-major (on the images' device).

    Shape:
        - Input: ``(B, C, H, W)``
        - Output: ``(B, Gh, Gw, C, patch, patch)`` with ``Gh = (H - patch) // stride + 1`` (``Gw`` alike)
    """
    grid = x.unfold(2, patch, stride).unfold(3, patch, stride)  # (B, C, Gh, Gw, p, p), a view
    return grid.permute(0, 2, 3, 1, 4, 5)  # (B, C, Gh, Gw, p, p) -> (B, Gh, Gw, C, p, p)


class PatchEncoder(nn.Module):
    """Evaluation encoder: fit to the training size, normalise, patchify, encode patches, mean-pool.

    No augmentation; images of another size are resized (shorter side) and centre-cropped to
    ``image_size`` first, so the grid is always the training grid.

    Shape:
        - Input: ``(B, 3, H, W)`` float in [0, 1] or uint8
        - Output: ``(B, num_features)``
    """

    def __init__(
        self, backbone: Backbone, normalize: nn.Module, image_size: int, patch: int, stride: int
    ) -> None:
        super().__init__()
        self.backbone, self.normalize = backbone, normalize
        self.image_size, self.patch, self.stride = image_size, patch, stride
        self.num_features = backbone.num_features

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch vectors ``(B, Gh, Gw, D)`` of normalised ``(B, 3, image_size, image_size)`` images."""
        grid = patchify(x, self.patch, self.stride)  # (B, Gh, Gw, 3, p, p)
        b, gh, gw = grid.shape[:3]
        z = self.backbone(grid.reshape(b * gh * gw, *grid.shape[3:]))  # (B*P, 3, p, p) -> (B*P, D)
        return z.view(b, gh, gw, -1)  # (B*P, D) -> (B, Gh, Gw, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(fit_images(to_float(x), self.image_size))
        return self.patch_features(x).mean(dim=(1, 2))  # (B, Gh, Gw, D) -> (B, D)


@dataclass(frozen=True)
class PatchGrid:
    """CPC's patch geometry on square images: patch side, stride, and the offsets that are predicted.

    Attributes:
        image_size: side of the square images the grid is cut from.
        patch: patch side in pixels.
        stride: step between patches in pixels.
        offsets: the prediction offsets ``k`` (rows ahead), increasing.
    """

    image_size: int
    patch: int
    stride: int
    offsets: tuple[int, ...]

    @property
    def grid(self) -> int:
        """Patches per side: ``(image_size - patch) // stride + 1``."""
        return (self.image_size - self.patch) // self.stride + 1

    @staticmethod
    @lru_cache(maxsize=64)
    def for_image(
        image_size: int, patch_size: int | None = None, patch_stride: int | None = None, max_offset: int = 5,
        skip_overlap: bool = True,
    ) -> PatchGrid:
        """The grid of ``image_size`` px images; ``None`` picks :func:`default_patch_grid`'s patch / stride.

        Offsets ``1..max_offset`` are predicted, less those whose target patches overlap the context row
        (``k * stride < patch``) with ``skip_overlap``; ``ConfigError`` when the images are smaller than a
        patch or the grid leaves no offset (``max_offset`` must be below the patches per side).
        """
        default_patch, default_stride = default_patch_grid(image_size)
        patch = default_patch if patch_size is None else patch_size
        stride = default_stride if patch_stride is None else patch_stride
        if not 1 <= patch <= image_size or stride < 1:
            raise ConfigError(
                f"need 1 <= patch_size <= image_size and patch_stride >= 1, got "
                f"patch_size={patch!r}, patch_stride={stride!r}, image_size={image_size!r}"
            )
        grid = (image_size - patch) // stride + 1
        offsets = tuple(k for k in range(1, max_offset + 1) if not (skip_overlap and k * stride < patch))
        if not offsets or max_offset >= grid:
            raise ConfigError(
                f"max_offset={max_offset!r} leaves no offset to predict on a {grid}x{grid} grid of "
                f"{image_size} px images (patch {patch}, stride {stride}, skip_overlap={skip_overlap}): need "
                f"max_offset < {grid}" + (" and max_offset * stride >= patch" if skip_overlap else "")
            )
        return PatchGrid(image_size, patch, stride, offsets)
