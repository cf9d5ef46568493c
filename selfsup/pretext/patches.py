"""The one tiling helper of the patch-based pretext tasks: a 3x3 grid of jittered, separated tiles.

Relative position (Doersch et al. 2015) and jigsaw (Noroozi & Favaro 2016) both cut an image into a
3x3 grid of cells and take one square tile per cell, at a random offset inside its cell (jitter) and
never touching its neighbours (a gap), so the network cannot solve the task by continuing lines or
textures across tile borders. :class:`TileGrid` holds the geometry, :meth:`TileGrid.origins` draws
the tiles' top-left corners for a batch, and :func:`cut_tiles` cuts them with one indexing op on the
device (no per-sample Python).

- [0] Unsupervised Visual Representation Learning by Context Prediction, Doersch et al. 2015,
  https://arxiv.org/abs/1505.05192
- [1] Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles, Noroozi & Favaro 2016,
  https://arxiv.org/abs/1603.09246
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from selfsup.data.transforms import PatchAugment
from selfsup.errors import ConfigError
from selfsup.pretext.task import Task

GRID = 3
"""Tiles per side of the grid (both papers use 3x3)."""

MIN_TILE = 16
"""Default smallest tile side the backbone sees: smaller tiles are upsampled to it (``patch_resize=None``).

A CIFAR-sized image gives 7 px tiles; a backbone that downsamples by 8 turns them into one feature
position, and what it learns there does not transfer to whole images. A one-off check on CIFAR-10
(32 px, ``convnet_small``, linear probe on a 10k-image subset): 7 px tiles as they are 36.8 % after
2,100 steps, below the 38.0 % random-init floor even with batch-norm statistics re-estimated on whole
images (36.2 %); tiles upsampled to 16 px 39.6 % after 800 steps. Reproducible figures: the README's
results table (``benchmarks/quality.py``), relative position at 25k and 100k training images."""


@dataclass(frozen=True)
class TileGrid:
    """Geometry of a 3x3 grid of tiles with gaps and jitter in a square image.

    The image side ``S`` is split into three cells of ``cell = S // 3`` pixels (the ``S - 3 * cell``
    spare pixels are split around the grid). Each tile is ``patch`` pixels square and sits in its cell
    at offset ``gap // 2 + j`` with ``j`` uniform in ``0..jitter`` per tile and axis, where
    ``jitter = cell - patch - gap``: any two tiles of a grid are at least ``gap`` pixels apart.

    Defaults derived from the image size (:meth:`for_image`): ``patch = round(0.7 * cell)`` and
    ``gap = max(1, round(0.1 * cell))``; the rest of the cell is jitter. So 32 px (CIFAR, the embedded
    digits) gives 7 px tiles, a gap of at least 1 px and up to 2 px of jitter; 16 px gives 4 px
    tiles, gap 1, no jitter; 96 px: 22 / 3 / 7; 224 px: 52 / 7 / 15 (Doersch et al. use 96 px
    patches, 48 px gaps and 7 px jitter on ~300 px images; Noroozi & Favaro 64 px tiles in 75 px cells).

    Attributes:
        image_size: side ``S`` of the square images the grid is cut from.
        patch: tile side in pixels.
        gap: smallest distance in pixels between two tiles.
        cell: cell side, ``S // 3``.
        jitter: largest random extra offset of a tile inside its cell, per axis.
    """

    image_size: int
    patch: int
    gap: int

    def __post_init__(self) -> None:
        if self.patch < 1 or self.gap < 0 or self.jitter < 0:
            raise ConfigError(
                f"tiles of {self.patch!r} px with a {self.gap!r} px gap do not fit a 3x3 grid of "
                f"{self.image_size!r} px images (cells of {self.cell} px): need patch >= 1, gap >= 0 and "
                f"patch + gap <= {self.cell}"
            )

    @property
    def cell(self) -> int:
        return self.image_size // GRID

    @property
    def jitter(self) -> int:
        return self.cell - self.patch - self.gap

    @staticmethod
    @lru_cache(maxsize=64)
    def for_image(image_size: int, patch: int | None = None, gap: int | None = None) -> TileGrid:
        """The grid for ``image_size`` px images; ``None`` picks the default patch / gap (see class doc)."""
        if image_size < GRID:
            raise ConfigError(f"a 3x3 tile grid needs images of at least 3 px, got {image_size!r}")
        cell = image_size // GRID
        patch = max(1, round(0.7 * cell)) if patch is None else patch
        gap = max(1, round(0.1 * cell)) if gap is None else gap
        return TileGrid(image_size, patch, gap)

    def origins(self, batch: int, device: torch.device | str, random: bool = True) -> torch.Tensor:
        """Top-left corners ``(row, col)`` of the nine tiles of each image, row-major over the grid.

        ``random=False`` centres every tile in the slack of its cell (no jitter), for evaluation and tests.

        Shape:
            - Output: ``(batch, 9, 2)`` int64 on ``device``
        """
        margin = (self.image_size - GRID * self.cell) // 2
        cells = torch.arange(GRID, device=device) * self.cell  # (3,)
        base = torch.stack(torch.meshgrid(cells, cells, indexing="ij"), dim=-1).view(GRID * GRID, 2)  # (9, 2)
        base = base + margin + self.gap // 2
        if random and self.jitter > 0:
            jit = torch.randint(0, self.jitter + 1, (batch, GRID * GRID, 2), device=device)  # (B, 9, 2)
        else:
            jit = torch.full((batch, GRID * GRID, 2), self.jitter // 2, device=device, dtype=torch.long)
        return base + jit  # (B, 9, 2)


def cut_tiles(x: torch.Tensor, origins: torch.Tensor, patch: int, channel_shift: torch.Tensor | None = None) -> torch.Tensor:
    """Cut square tiles at per-image corners with one advanced-indexing gather (on the images' device).

    Args:
        x: images ``(B, C, H, W)``.
        origins: top-left corners ``(row, col)`` of ``T`` tiles per image, ``(B, T, 2)`` int64.
        patch: tile side in pixels.
        channel_shift: optional extra offset ``(row, col)`` of every channel of every tile, ``(B, T, C, 2)``
            int64: each colour channel is cut from its own, shifted window (Noroozi & Favaro's spatial jitter
            of the colour channels against chromatic aberration); pixels beyond the border repeat the edge.

    Shape:
        - Output: ``(B, T, C, patch, patch)``; tile ``t`` of image ``b`` is
          ``x[b, :, r:r + patch, c:c + patch]`` with ``(r, c) = origins[b, t]`` (channel ``k`` shifted by
          ``channel_shift[b, t, k]`` when given).
    """
    b, t = origins.shape[:2]
    offs = torch.arange(patch, device=x.device)  # (p,)
    bidx = torch.arange(b, device=x.device).view(b, 1, 1, 1)  # (B, 1, 1, 1)
    if channel_shift is None:
        rows = origins[..., 0, None] + offs  # (B, T, p)
        cols = origins[..., 1, None] + offs  # (B, T, p)
        # The advanced indices (separated by the channel slice) broadcast to (B, T, p, p) and come first.
        tiles = x[bidx, :, rows[:, :, :, None], cols[:, :, None, :]]  # (B, T, p, p, C)
        return tiles.permute(0, 1, 4, 2, 3)  # (B, T, p, p, C) -> (B, T, C, p, p)
    pad = int(channel_shift.abs().max()) if channel_shift.numel() else 0
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    corner = origins[:, :, None, :] + channel_shift + pad  # (B, T, C, 2)
    rows = corner[..., 0, None] + offs  # (B, T, C, p)
    cols = corner[..., 1, None] + offs  # (B, T, C, p)
    cidx = torch.arange(x.shape[1], device=x.device).view(1, 1, -1, 1, 1)  # (1, 1, C, 1, 1)
    return x[bidx[..., None], cidx, rows[..., :, None], cols[..., None, :]]  # (B, T, C, p, p)


def normalize_tiles(tiles: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each channel of each tile to mean 0 and standard deviation 1, on its own (Noroozi & Favaro 2016, 3.3).

    Adjacent tiles share low-level statistics (brightness, contrast), so a puzzle could be solved from
    each tile's mean and spread without looking at its content; normalising every tile on its own removes
    that shortcut. A constant channel (std below ``eps``) becomes 0.

    Shape:
        - Input: ``(..., C, p, p)`` -> Output: same shape
    """
    mean = tiles.mean(dim=(-2, -1), keepdim=True)  # (..., C, 1, 1)
    std = tiles.std(dim=(-2, -1), keepdim=True, unbiased=False)  # (..., C, 1, 1)
    flat = std < eps  # (..., C, 1, 1): nothing to normalise; rounding would leave tiny values
    return torch.where(flat, torch.zeros_like(tiles), (tiles - mean) / std.clamp_min(eps))


def tile_side(patch: int, patch_resize: int | None) -> int:
    """The side tiles of ``patch`` px are resized to: ``patch_resize``; ``None``: at least :data:`MIN_TILE`; 0: ``patch``."""
    if patch_resize is None:
        return max(patch, MIN_TILE)
    return patch_resize or patch


def resize_tiles(tiles: torch.Tensor, size: int | None) -> torch.Tensor:
    """Upsample (bilinear) tiles for the backbone; ``None`` or their own size leaves them as they are.

    Shape:
        - Input: ``(N, C, p, p)`` -> Output: ``(N, C, size, size)``
    """
    if size is None or size == tiles.shape[-1]:
        return tiles
    return torch.nn.functional.interpolate(tiles, size=(size, size), mode="bilinear", align_corners=False)


def check_tile_options(patch_size: int | None, patch_gap: int | None, patch_resize: int | None) -> None:
    """``ConfigError`` for tile options that no image size can satisfy (the rest is checked per image size)."""
    for name, v, low in (("patch_size", patch_size, 1), ("patch_gap", patch_gap, 0), ("patch_resize", patch_resize, 0)):
        if v is not None and v < low:
            raise ConfigError(f"{name} must be >= {low} or None, got {v!r}")


def square_side(x: torch.Tensor) -> int:
    """The side of square images ``(B, C, S, S)``; ``ConfigError`` for non-square ones."""
    if x.shape[-1] != x.shape[-2]:
        raise ConfigError(f"the tile grid needs square images, got {tuple(x.shape[-2:])}")
    return int(x.shape[-1])


def concat_head(in_features: int, hidden: int, classes: int) -> torch.nn.Module:
    """The classifier over concatenated tile features: ``Linear -> BatchNorm1d -> ReLU -> Linear``.

    Shape:
        - Input: ``(B, in_features)`` -> Output: ``(B, classes)`` logits
    """
    if hidden < 1:
        raise ConfigError(f"head_hidden must be >= 1, got {hidden!r}")
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes)
    )


class TileTask(Task):
    """What the tile tasks share: tile options, per-tile augmentation, an MLP over concatenated tile features.

    A subclass cuts its tiles ``(B, T, C, p, p)`` and labels ``(B,)`` from the prepared images on the
    :meth:`grid` of their size, and hands them to :meth:`classify`.

    Args: the tile options of :class:`~selfsup.pretext.relative_position.RelativePosition`, and
        ``tile_norm``: normalise every channel of every tile to mean 0 and std 1 on its own
        (:func:`normalize_tiles`, jigsaw's default).
    """

    def __init__(
        self, tiles_per_image: int, num_features: int, classes: int, *, patch_size: int | None,
        patch_gap: int | None, patch_resize: int | None, color_drop: float, head_hidden: int,
        tile_norm: bool = False,
    ) -> None:
        super().__init__()
        check_tile_options(patch_size, patch_gap, patch_resize)
        self.patch_size, self.patch_gap, self.patch_resize = patch_size, patch_gap, patch_resize
        self.tile_norm = bool(tile_norm)
        self.augment = PatchAugment(color_drop=color_drop, flip=0.0)
        self.head = concat_head(tiles_per_image * num_features, head_hidden, classes)

    def grid(self, x: torch.Tensor) -> TileGrid:
        """The tile grid of square images ``x`` with this task's options."""
        return TileGrid.for_image(square_side(x), self.patch_size, self.patch_gap)

    def backbone_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """The tiles as the backbone sees them: resized, normalised one by one (``tile_norm``), colour-dropped.

        Normalisation comes before colour dropping, so that a dropped channel stays faint noise.

        Shape:
            - Input: ``(B, T, C, p, p)`` -> Output: ``(B*T, C, p', p')``
        """
        side = tile_side(tiles.shape[-1], self.patch_resize)
        flat = resize_tiles(tiles.flatten(0, 1), side)  # (B, T, C, p, p) -> (B*T, C, p', p')
        if self.tile_norm:
            flat = normalize_tiles(flat)
        if self.training:
            flat = self.augment(flat)
        return flat

    def classify(self, tiles: torch.Tensor, labels: torch.Tensor, backbone) -> dict[str, torch.Tensor]:
        """Every tile through the backbone in one pass, their features concatenated per image, cross-entropy.

        Shape:
            - Input: tiles ``(B, T, C, p, p)``, labels ``(B,)``
        """
        b = tiles.shape[0]
        logits = self.head(backbone(self.backbone_tiles(tiles)).view(b, -1))  # (B*T, D) -> (B, T*D), tile order kept
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, f"{self.task_name}_acc": (logits.argmax(1) == labels).float().mean()}
