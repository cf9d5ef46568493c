"""Rotation prediction: classify which of four quarter turns was applied to an image.

- [0] Unsupervised Representation Learning by Predicting Image Rotations, Gidaris et al. 2018,
  https://arxiv.org/abs/1803.07728
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.errors import ConfigError
from selfsup.pretext.task import Task, TaskMethod, register_task
from selfsup.ssl.module import register_method


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image in all four rotations, and the rotation labels.

    Image ``i`` rotated by ``k`` quarter turns (counter-clockwise, ``torch.rot90``) sits at row
    ``k * B + i`` with label ``k``.

    Shape:
        - Input: ``(B, C, H, W)`` with ``H == W``
        - Output: ``(4B, C, H, W)`` images and ``(4B,)`` int64 labels
    """
    if x.shape[-1] != x.shape[-2]:
        raise ConfigError(f"rotation needs square images, got {tuple(x.shape[-2:])}")
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])  # (4B, C, H, W)
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])  # (4B,)
    return rotated, labels


@register_task("rotation")
class RotationTask(Task):
    """All four rotations of every image through the backbone, a 4-way head on the pooled features.

    Args: see :class:`Rotation`.
    """

    def __init__(self, num_features: int, in_chans: int = 3, *, head_hidden: int = 0) -> None:
        super().__init__()
        if head_hidden < 0:
            raise ConfigError(f"head_hidden must be >= 0, got {head_hidden!r}")
        d = num_features
        self.head = (
            nn.Linear(d, 4)
            if head_hidden == 0
            else nn.Sequential(nn.Linear(d, head_hidden), nn.BatchNorm1d(head_hidden), nn.ReLU(), nn.Linear(head_hidden, 4))
        )

    def forward(self, x, backbone, prepare):
        rotated, labels = rotate_batch(x)
        feats = backbone(prepare(rotated))  # (4B, D)
        logits = self.head(feats)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "rotation_acc": acc, "features": feats[: x.shape[0]].detach()}


@register_method("rotation")
class Rotation(TaskMethod):
    """4-way rotation classification on the pooled backbone features (Gidaris et al. 2018).

    Args:
        head_hidden: hidden width of the rotation head; 0 for a linear head.
    """

    def __init__(self, *, head_hidden: int = 0, **base) -> None:
        super().__init__(**(self.base_defaults | base))
        self.task = RotationTask(self.num_features, self.backbone.in_chans, head_hidden=head_hidden)

