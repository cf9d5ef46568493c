"""Relative position (context prediction): which of its 8 neighbours is a patch to the centre patch?

The image is cut into a 3x3 grid of tiles with gaps and jitter (:mod:`selfsup.pretext.patches`); the
centre tile and one random neighbour go through the shared backbone, and a small MLP on their
concatenated pooled features classifies the neighbour's position (8 classes). Shortcuts are removed as
in the paper: gaps and jitter between the tiles, and optionally colour dropping per tile (two of the
three colour channels replaced by faint noise, so chromatic aberration cannot tell where a patch sits).

- [0] Unsupervised Visual Representation Learning by Context Prediction, Doersch et al. 2015,
  https://arxiv.org/abs/1505.05192
"""

from __future__ import annotations

import torch

from selfsup.pretext.patches import TileGrid, TileTask, cut_tiles
from selfsup.pretext.task import TaskMethod, register_task
from selfsup.ssl.module import register_method

CENTRE = 4
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
"""Grid cells (row-major over the 3x3 grid) of the eight neighbours; label ``k`` is cell ``NEIGHBOURS[k]``:
0 top-left, 1 top, 2 top-right, 3 left, 4 right, 5 bottom-left, 6 bottom, 7 bottom-right."""


def patch_pairs(
    x: torch.Tensor, grid: TileGrid, labels: torch.Tensor | None = None, random: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre tile and one neighbour tile of every image, and the neighbour's position label.

    Args:
        x: images ``(B, C, S, S)`` with ``S == grid.image_size``.
        grid: the tile geometry.
        labels: neighbour labels ``(B,)`` in ``0..7`` (see :data:`NEIGHBOURS`); ``None`` draws them uniformly.
        random: jitter the tiles (see :meth:`TileGrid.origins`).

    Shape:
        - Output: pairs ``(B, 2, C, p, p)`` (centre first) and labels ``(B,)`` int64
    """
    b, dev = x.shape[0], x.device
    if labels is None:
        labels = torch.randint(0, len(NEIGHBOURS), (b,), device=dev)
    origins = grid.origins(b, dev, random=random)  # (B, 9, 2)
    cells = torch.tensor(NEIGHBOURS, device=dev)[labels]  # (B,)
    which = torch.stack([torch.full_like(cells, CENTRE), cells], dim=1)  # (B, 2)
    pair_origins = origins.gather(1, which[..., None].expand(-1, -1, 2))  # (B, 2, 2)
    return cut_tiles(x, pair_origins, grid.patch), labels


@register_task("relative_position")
class RelativePositionTask(TileTask):
    """Centre and neighbour tiles through the backbone, an 8-way MLP on their concatenated features.

    Args: see :class:`RelativePosition`.
    """

    def __init__(
        self,
        num_features: int,
        in_chans: int = 3,
        *,
        patch_size: int | None = None,
        patch_gap: int | None = None,
        patch_resize: int | None = None,
        color_drop: float = 0.0,
        head_hidden: int = 512,
    ) -> None:
        super().__init__(2, num_features, len(NEIGHBOURS), patch_size=patch_size, patch_gap=patch_gap,
                         patch_resize=patch_resize, color_drop=color_drop, head_hidden=head_hidden)

    def forward(self, x, backbone, prepare):
        pairs, labels = patch_pairs(prepare(x), self.grid(x), random=self.training)  # (B, 2, C, p, p), (B,)
        return self.classify(pairs, labels, backbone)


@register_method("relative_position")
class RelativePosition(TaskMethod):
    """Relative patch position, 8-way (Doersch et al. 2015); the exported encoder encodes whole images.

    The tile grid follows the size of the training images (:meth:`TileGrid.for_image`): at 32 px,
    7 px tiles at least 1 px apart with up to 2 px of jitter; at 16 px, 4 px tiles with a 1 px gap.
    Tiles under 16 px are upsampled to 16 px before the backbone (``patch_resize``).

    Args:
        patch_size: tile side in pixels; ``None`` derives it from the image size (0.7 of a grid cell).
        patch_gap: smallest gap between tiles in pixels; ``None``: 0.1 of a cell, at least 1 px.
        patch_resize: side tiles are resized to (bilinear) before the backbone; ``None``: tiles under 16 px
            are upsampled to 16 px (:data:`~selfsup.pretext.patches.MIN_TILE`: at 32 px, 7 px tiles as
            they are learn features that are worse than random ones on whole images); 0: never resize.
        color_drop: probability that a tile keeps one random colour channel only (the others faint
            noise): the paper's colour dropping against chromatic aberration. Off by default: at 32 px
            there is no chromatic aberration to hide, and with batch norm the dropped channels shift the
            statistics between training tiles and the full-colour images the encoder is evaluated on
            (300 steps on CIFAR-10, quick probe: 31.4% with 1.0 vs 37.4% with 0.0).
        head_hidden: hidden width of the MLP on the concatenated pair features.
    """

    def __init__(
        self,
        *,
        patch_size: int | None = None,
        patch_gap: int | None = None,
        patch_resize: int | None = None,
        color_drop: float = 0.0,
        head_hidden: int = 512,
        **base,
    ) -> None:
        super().__init__(**(self.base_defaults | base))
        self.task = RelativePositionTask(
            self.num_features, self.backbone.in_chans, patch_size=patch_size, patch_gap=patch_gap,
            patch_resize=patch_resize, color_drop=color_drop, head_hidden=head_hidden,
        )

