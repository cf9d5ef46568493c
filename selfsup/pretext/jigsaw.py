"""Jigsaw puzzles: which of a fixed set of permutations shuffled the 3x3 tiles of an image?

The image is cut into a 3x3 grid of tiles with gaps and jitter (:mod:`selfsup.pretext.patches`, the
same helper as relative position); the tiles are shuffled by one permutation of a fixed set chosen for
large Hamming distance (:func:`permutation_set`); every tile goes through the shared backbone, and
an MLP on the nine concatenated pooled features (in shuffled order) classifies the permutation index.
As in the paper, every tile is normalised on its own (mean and std per channel), its colour channels
are jittered independently and a share of the images is grey, so that neither low-level statistics
nor chromatic aberration can place a tile.

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


PERMUTATION_SELECTIONS = ("maxmin", "mean")
"""How :func:`permutation_set` picks the next permutation: ``maxmin`` the largest minimum Hamming distance to
those chosen so far, ``mean`` the largest mean distance (Noroozi & Favaro's Algorithm 1)."""


@lru_cache(maxsize=8)
def permutation_set(n: int = 100, seed: int = 0, selection: str = "maxmin") -> tuple[np.ndarray, int]:
    """``n`` permutations of the nine tiles chosen greedily far apart in Hamming distance.

    Starts from one permutation drawn with ``seed``, then repeatedly adds the permutation farthest from
    those chosen so far (the first such one in lexicographic order on ties), vectorised over all ``9!``
    permutations. "Farthest" is, by ``selection``:

    - ``"mean"``: the largest mean (equivalently summed) Hamming distance to the chosen ones: Algorithm 1
      of Noroozi & Favaro 2016 (``D̄ = 1ᵀD``, ``j = argmax D̄``). For 100 permutations of seed 0 the
      pairwise distances average 8.08 but the closest pair differs in only 2 tiles.
    - ``"maxmin"``: the largest minimum distance to the chosen ones (farthest-point sampling): a set whose
      closest pair is as far apart as greedy selection gets, 6 of 9 tiles for 100 permutations (mean 8.03).

    Deterministic for a given ``(n, seed, selection)``; cached.

    Returns:
        The permutations ``(n, 9)`` int64 (row ``k`` puts original tile ``perm[i]`` at position ``i``)
        and their minimum pairwise Hamming distance.
    """
    perms = all_permutations()
    if not 2 <= n <= len(perms):
        raise ConfigError(f"num_permutations must be in [2, {len(perms)}], got {n!r}")
    if selection not in PERMUTATION_SELECTIONS:
        raise ConfigError(f"permutation_selection must be one of {PERMUTATION_SELECTIONS}, got {selection!r}")
    chosen = [int(np.random.default_rng(seed).integers(len(perms)))]
    if selection == "maxmin":
        # score[q]: Hamming distance of permutation q to the nearest chosen one (0 for chosen ones).
        score = np.full(len(perms), TILES + 1, dtype=np.int32)
    else:
        # score[q]: summed Hamming distance of permutation q to the chosen ones; -1 marks chosen ones.
        score = np.zeros(len(perms), dtype=np.int32)
    for _ in range(n - 1):
        dist = (perms != perms[chosen[-1]]).sum(1, dtype=np.int32)  # (9!,)
        if selection == "maxmin":
            np.minimum(score, dist, out=score)
        else:
            score += dist
            score[chosen] = -1
        chosen.append(int(score.argmax()))
    out = perms[chosen].astype(np.int64)
    pairwise = (out[:, None, :] != out[None, :, :]).sum(-1)  # (n, n)
    np.fill_diagonal(pairwise, TILES + 1)
    return out, int(pairwise.min())


def shuffle_tiles(tiles: torch.Tensor, perms: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Put tile ``perms[labels[b], i]`` of image ``b`` at position ``i``.

    Shape:
        - Input: tiles ``(B, 9, C, p, p)``, perms ``(P, 9)``, labels ``(B,)``
        - Output: ``(B, 9, C, p, p)``
    """
    order = perms[labels]  # (B, 9)
    return tiles[torch.arange(tiles.shape[0], device=tiles.device)[:, None], order]  # (B, 9, C, p, p)


def to_grayscale(x: torch.Tensor, p: float) -> torch.Tensor:
    """Each RGB image replaced, with probability ``p``, by its luma (ITU-R BT.601) in all three channels.

    Shape:
        - Input: ``(B, 3, H, W)`` in [0, 1] -> Output: same shape
    """
    if p <= 0:
        return x
    luma = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # (B, 1, H, W)
    gray = torch.rand(x.shape[0], device=x.device) < p  # (B,)
    return torch.where(gray[:, None, None, None], luma.expand_as(x), x)


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
        permutation_selection: str = "maxmin",
        patch_size: int | None = None,
        patch_gap: int | None = None,
        patch_resize: int | None = None,
        tile_norm: bool = True,
        channel_jitter: int | None = None,
        grayscale: float = 0.3,
        color_drop: float = 0.0,
        head_hidden: int = 512,
    ) -> None:
        super().__init__(TILES, num_features, num_permutations, patch_size=patch_size, patch_gap=patch_gap,
                         patch_resize=patch_resize, color_drop=color_drop, head_hidden=head_hidden,
                         tile_norm=tile_norm)
        if channel_jitter is not None and channel_jitter < 0:
            raise ConfigError(f"channel_jitter must be >= 0 or None, got {channel_jitter!r}")
        if not 0.0 <= grayscale <= 1.0:
            raise ConfigError(f"grayscale must be a probability in [0, 1], got {grayscale!r}")
        self.channel_jitter, self.grayscale = channel_jitter, grayscale
        perms, _ = permutation_set(num_permutations, selection=permutation_selection)
        self.register_buffer("perms", torch.from_numpy(perms), persistent=False)  # (P, 9), regenerated

    def jitter_px(self, patch: int) -> int:
        """Largest shift of a colour channel for tiles of ``patch`` px: the option, or 2 px per 64 px as the paper."""
        return max(1, round(patch * 2 / 64)) if self.channel_jitter is None else self.channel_jitter

    def puzzles(self, x: torch.Tensor, prepare) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffled tiles ``(B, 9, C, p, p)`` of the prepared images and their permutation labels ``(B,)``.

        In training a ``grayscale`` share of the images lose their colour first and every colour channel of
        every tile is cut from its own window shifted by up to ``channel_jitter`` px (Noroozi & Favaro 2016,
        section 3.3, against chromatic aberration); in evaluation neither.
        """
        grid, b = self.grid(x), x.shape[0]
        if self.training:
            x = to_grayscale(x, self.grayscale)
        img = prepare(x)
        origins = grid.origins(b, x.device, random=self.training)  # (B, 9, 2)
        shift = None
        j = self.jitter_px(grid.patch)
        if self.training and j > 0 and img.shape[1] > 1:
            shift = torch.randint(-j, j + 1, (b, TILES, img.shape[1], 2), device=x.device)  # (B, 9, C, 2)
        tiles = cut_tiles(img, origins, grid.patch, shift)  # (B, 9, C, p, p)
        labels = torch.randint(0, self.perms.shape[0], (b,), device=x.device)  # (B,)
        return shuffle_tiles(tiles, self.perms, labels), labels

    def forward(self, x, backbone, prepare):
        tiles, labels = self.puzzles(x, prepare)
        return self.classify(tiles, labels, backbone)


@register_method("jigsaw")
class Jigsaw(TaskMethod):
    """Jigsaw puzzle of 3x3 tiles (Noroozi & Favaro 2016); the exported encoder encodes whole images.

    The tile grid follows the size of the training images, as for relative position (see
    :class:`~selfsup.pretext.patches.TileGrid`): at 32 px, 7 px tiles at least 1 px apart with up to
    2 px of jitter, upsampled to 16 px before the backbone. Each step encodes nine tiles per image.
    The paper's guards against shortcuts are on by default: every tile normalised on its own, colour
    channels jittered per tile, 30 % of images grey (its section 3.3).

    Args:
        num_permutations: size of the permutation set (classes), chosen far apart in Hamming distance.
        permutation_selection: ``maxmin`` (default) or ``mean`` (the paper's Algorithm 1); see
            :func:`permutation_set`.
        patch_size: tile side in pixels; ``None`` derives it from the image size (0.7 of a grid cell).
        patch_gap: smallest gap between tiles in pixels; ``None``: 0.1 of a cell, at least 1 px.
        patch_resize: side tiles are resized to (bilinear) before the backbone; ``None``: tiles under 16 px
            are upsampled to 16 px (:data:`~selfsup.pretext.patches.MIN_TILE`: at 32 px, 7 px tiles as
            they are learn features that are worse than random ones on whole images); 0: never resize.
        tile_norm: normalise each channel of each tile to mean 0 and std 1 on its own, so the puzzle
            cannot be solved from the tiles' brightness and contrast (the paper's guard; without it a
            logistic regression on the nine tiles' means and stds finds the permutation far above chance).
        channel_jitter: largest shift in pixels of each colour channel of a tile, drawn per tile and
            channel (training only); ``None``: 2 px per 64 px of tile, at least 1 (the paper's +-2 px of
            64 px tiles); 0: off.
        grayscale: share of training images made grey before tiling (the paper's 30 %).
        color_drop: probability that a tile keeps one random colour channel only (the others faint noise);
            off by default, as for :class:`~selfsup.pretext.relative_position.RelativePosition`.
        head_hidden: hidden width of the MLP on the nine concatenated tile features.
    """

    def __init__(
        self,
        *,
        num_permutations: int = 100,
        permutation_selection: str = "maxmin",
        patch_size: int | None = None,
        patch_gap: int | None = None,
        patch_resize: int | None = None,
        tile_norm: bool = True,
        channel_jitter: int | None = None,
        grayscale: float = 0.3,
        color_drop: float = 0.0,
        head_hidden: int = 512,
        **base,
    ) -> None:
        super().__init__(**(self.base_defaults | base))
        self.task = JigsawTask(
            self.num_features, self.backbone.in_chans, num_permutations=num_permutations,
            permutation_selection=permutation_selection, patch_size=patch_size, patch_gap=patch_gap,
            patch_resize=patch_resize, tile_norm=tile_norm, channel_jitter=channel_jitter, grayscale=grayscale,
            color_drop=color_drop, head_hidden=head_hidden,
        )
