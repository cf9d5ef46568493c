"""Features from every stage of a backbone, each max-pooled to a small grid: DCGAN's probe [0].

Radford et al. (section 5.1) classified CIFAR-10 with "all layers" of a discriminator: each layer's
conv features max-pooled to a 4x4 spatial grid, flattened and concatenated into one vector, then a
regularised linear L2-SVM. Here a "layer" is a stage of the backbone as timm reports it
(``forward_intermediates`` / ``feature_info``), so the size is ``16 * sum(stage channels)``
whatever the image size: 5,632 for ``convnet_small`` (32+64+128+128 channels), 16,384 for
``cifar_resnet18`` (stem 64, then 64+128+256+512); the paper's discriminator gave 28,672.

- [0] DCGAN, Radford et al. 2016, https://arxiv.org/abs/1511.06434
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.ssl.backbone import Backbone

GRID = 4  # the paper's 4x4 spatial grid


def max_pool_stages(stages: list[torch.Tensor], grid: int = GRID) -> torch.Tensor:
    """Max-pool each stage's map to ``grid x grid``, flatten, and concatenate (channel-major per stage).

    Maps smaller than the grid are upsampled by repetition (``adaptive_max_pool2d``'s windows overlap).

    Shape:
        - Input: a list of ``(B, C_i, H_i, W_i)`` -> Output: ``(B, grid * grid * sum_i C_i)``
    """
    # each (B, C_i, H_i, W_i) -> (B, C_i, grid, grid) -> (B, C_i * grid * grid)
    return torch.cat([F.adaptive_max_pool2d(s, grid).flatten(1) for s in stages], dim=1)


class StageFeatureEncoder(nn.Module):
    """RGB images in [0, 1] (or uint8) -> normalised -> every stage of the backbone -> :func:`max_pool_stages`.

    Args:
        backbone: the backbone whose stages are read (its ``forward_intermediates``).
        normalize: the input adapter the backbone was trained behind.
        grid: side of the pooled grid.

    Shape:
        - Input: ``(B, 3, H, W)`` -> Output: ``(B, num_features)``, ``num_features = grid**2 * sum(stage_channels)``
    """

    def __init__(self, backbone: Backbone, normalize: nn.Module, grid: int = GRID) -> None:
        super().__init__()
        self.backbone, self.normalize, self.grid = backbone, normalize, grid
        self.num_features = grid * grid * sum(backbone.stage_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, stages = self.backbone.forward_intermediates(self.normalize(x))
        return max_pool_stages(stages, self.grid)
