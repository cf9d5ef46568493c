"""Jigsaw puzzles: which of a fixed set of permutations shuffled the 3x3 tiles of an image?

The image is cut into a 3x3 grid of tiles with gaps and jitter (:mod:`selfsup.pretext.patches`, the
same helper as relative position); the tiles are shuffled by one permutation of a fixed set chosen for
maximal Hamming distance (:func:`permutation_set`); every tile goes through the shared backbone, and
an MLP on the nine concatenated pooled features (in shuffled order) classifies the permutation index.
Optionally each tile gets colour dropping, so tiles cannot be matched by colour statistics alone.

- [0] Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles, Noroozi & Favaro 2016,
  https://arxiv.org/abs/1603.09246
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import torch

from selfsup.errors import ConfigError
from selfsup.pretext.patches import GRID, TileTask, cut_tiles
from selfsup.pretext.task import TaskMethod, register_task
from selfsup.ssl.module import register_method

TILES = GRID * GRID


@lru_cache(maxsize=1)
def all_permutations() -> np.ndarray:
    """All ``9! = 362880`` permutations of the nine tiles, lexicographic, ``(362880, 9)`` int8."""
    return np.array(list(itertools.permutations(range(TILES))), dtype=np.int8)


@lru_cache(maxsize=8)
def permutation_set(n: int = 100, seed: int = 0) -> tuple[np.ndarray, int]:
    """``n`` permutations of the nine tiles chosen greedily for maximal Hamming distance (the paper's Alg. 1).

    Starts from one permutation drawn with ``seed``, then repeatedly adds the permutation whose
    minimum Hamming distance to the permutations chosen so far is largest (the first such one in
    lexicographic order on ties), vectorised over all ``9!`` permutations. Deterministic for a given
    ``(n, seed)``; cached.

    Returns:
        The permutations ``(n, 9)`` int64 (row ``k`` puts original tile ``perm[i]`` at position ``i``)
        and the promise: their minimum pairwise Hamming distance (for the default 100 of seed 0: 6).
    """
    perms = all_permutations()
    if not 2 <= n <= len(perms):
        raise ConfigError(f"num_permutations must be in [2, {len(perms)}], got {n!r}")
    chosen = [int(np.random.default_rng(seed).integers(len(perms)))]
    # min_dist[q]: Hamming distance of permutation q to the nearest chosen one (0 for chosen ones).
    min_dist = np.full(len(perms), TILES + 1, dtype=np.int8)
    promise = TILES
    for _ in range(n - 1):
        np.minimum(min_dist, (perms != perms[chosen[-1]]).sum(1, dtype=np.int8), out=min_dist)
        nxt = int(min_dist.argmax())
        promise = min(promise, int(min_dist[nxt]))
        chosen.append(nxt)
    return perms[chosen].astype(np.int64), promise


def shuffle_tiles(tiles: torch.Tensor, perms: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Put tile ``perms[labels[b], i]`` of image ``b`` at position ``i``.

    Shape:
        - Input: tiles ``(B, 9, C, p, p)``, perms ``(P, 9)``, labels ``(B,)``
        - Output: ``(B, 9, C, p, p)``
    """
    order = perms[labels]  # (B, 9)
    return tiles[torch.arange(tiles.shape[0], device=tiles.device)[:, None], order]  # (B, 9, C, p, p)


@register_task("jigsaw")
class JigsawTask(TileTask):
    """Nine shuffled tiles through the backbone, a ``num_permutations``-way MLP on their concatenated features.

    Args: see :class:`Jigsaw`.
    """

    def __init__(
        self,
        num_features: int,
        in_chans: int = 3,
        *,
        num_permutations: int = 100,
        patch_size: int | None = None,
        patch_gap: int | None = None,
        patch_resize: int | None = None,
        color_drop: float = 0.0,
        head_hidden: int = 512,
    ) -> None:
        super().__init__(TILES, num_features, num_permutations, patch_size=patch_size, patch_gap=patch_gap,
                         patch_resize=patch_resize, color_drop=color_drop, head_hidden=head_hidden)
        perms, _ = permutation_set(num_permutations)
        self.register_buffer("perms", torch.from_numpy(perms), persistent=False)  # (P, 9), regenerated

    def forward(self, x, backbone, prepare):
        grid, b = self.grid(x), x.shape[0]
        tiles = cut_tiles(prepare(x), grid.origins(b, x.device, random=self.training), grid.patch)  # (B, 9, C, p, p)
        labels = torch.randint(0, self.perms.shape[0], (b,), device=x.device)  # (B,)
        return self.classify(shuffle_tiles(tiles, self.perms, labels), labels, backbone)


@register_method("jigsaw")
class Jigsaw(TaskMethod):
    """Jigsaw puzzle of 3x3 tiles (Noroozi & Favaro 2016); the exported encoder encodes whole images.

    The tile grid follows the size of the training images, as for relative position (see
    :class:`~selfsup.pretext.patches.TileGrid`): at 32 px, 7 px tiles at least 1 px apart with up to
    2 px of jitter, upsampled to 16 px before the backbone. Each step encodes nine tiles per image.

    Args:
        num_permutations: size of the permutation set (classes), chosen for maximal Hamming distance.
        patch_size: tile side in pixels; ``None`` derives it from the image size (0.7 of a grid cell).
        patch_gap: smallest gap between tiles in pixels; ``None``: 0.1 of a cell, at least 1 px.
        patch_resize: side tiles are resized to (bilinear) before the backbone; ``None``: tiles under 16 px
            are upsampled to 16 px (:data:`~selfsup.pretext.patches.MIN_TILE`: at 32 px, 7 px tiles as
            they are learn features that are worse than random ones on whole images); 0: never resize.
        color_drop: probability that a tile keeps one random colour channel only (the others faint noise);
            off by default, as for :class:`~selfsup.pretext.relative_position.RelativePosition`.
        head_hidden: hidden width of the MLP on the nine concatenated tile features.
    """

    def __init__(
        self,
        *,
        num_permutations: int = 100,
        patch_size: int | None = None,
        patch_gap: int | None = None,
        patch_resize: int | None = None,
        color_drop: float = 0.0,
        head_hidden: int = 512,
        **base,
    ) -> None:
        super().__init__(**(self.base_defaults | base))
        self.task = JigsawTask(
            self.num_features, self.backbone.in_chans, num_permutations=num_permutations, patch_size=patch_size,
            patch_gap=patch_gap, patch_resize=patch_resize, color_drop=color_drop, head_hidden=head_hidden,
        )

