"""The quantised ab colour space of colorization: in-gamut bins, soft targets, class rebalancing, decoding.

Plain functions over tensors (no Lightning), after Zhang et al. 2016, Sec. 2.1-2.3. Colours are CIE Lab
(D65, 2 degree observer) as computed by :func:`kornia.color.rgb_to_lab`: L in [0, 100], a and b roughly
in [-110, 110] for sRGB colours.

- [0] Colorful Image Colorization, Zhang et al. 2016, https://arxiv.org/abs/1603.08511
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_lab

from selfsup.errors import ConfigError

AB_GRID = 10.0
"""Side of an ab bin (the paper's grid size)."""


def _cube_surface(faces_n: int, edges_n: int) -> torch.Tensor:
    """sRGB colours on the faces (``faces_n``\u00b2 each) and, denser, the 12 edges of the RGB cube.

    Shape:
        - Output: ``(3, 6 * faces_n**2 + 12 * edges_n)`` float64 in [0, 1]
    """
    parts = []
    v = torch.linspace(0, 1, faces_n, dtype=torch.float64)
    u, w = (t.reshape(-1) for t in torch.meshgrid(v, v, indexing="ij"))
    e = torch.linspace(0, 1, edges_n, dtype=torch.float64)
    for axis in range(3):
        for c in (0.0, 1.0):
            face = [u, w]
            face.insert(axis, torch.full_like(u, c))
            parts.append(torch.stack(face))
            for c2 in (0.0, 1.0):
                edge = [torch.full_like(e, c), torch.full_like(e, c2)]
                edge.insert(axis, e)
                parts.append(torch.stack(edge))
    return torch.cat(parts, 1)


@functools.cache
def _gamut_bins(grid: float) -> torch.Tensor:
    # The ab footprint of the sRGB solid is the footprint of its surface (a line along L through an
    # inside colour leaves the solid through the surface), and its outermost points lie on the cube's
    # edges: sampling the surface, the edges densely, finds every bin some sRGB colour falls into.
    rgb = _cube_surface(64, 4096)
    ab = rgb_to_lab(rgb.reshape(1, 3, -1, 1))[0, 1:, :, 0]  # (2, N), float64
    cells = torch.unique(torch.round(ab / grid).long().T, dim=0)  # (Q, 2), sorted by a then b
    return cells.float() * grid


def gamut_bins(grid: float = AB_GRID) -> torch.Tensor:
    """Centres of the ab bins that some sRGB colour falls into, on a grid of side ``grid``.

    A bin is the square of side ``grid`` around a multiple of ``grid``; it is kept when an sRGB colour
    (at any lightness) has its ab inside it, so the nearest bin of every sRGB colour is kept and no kept
    bin is unreachable. Computed (once per process, deterministically) from the surface of the RGB
    cube converted to Lab; never a hard-coded list. At grid 10 this gives 262 bins with a in [-90, 100]
    and b in [-110, 90] -- the paper's extents, but not its 313: the sRGB solid's footprint on the ab
    plane covers 262 cells of the grid, so the paper's set must hold cells no sRGB colour reaches.

    Shape:
        - Output: ``(Q, 2)`` float32 ab centres
    """
    if grid <= 0:
        raise ConfigError(f"ab grid size must be positive, got {grid!r}")
    return _gamut_bins(float(grid)).clone()


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, k: int = 5, sigma: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-encode ab values on their ``k`` nearest bins with a Gaussian kernel (paper Sec. 2.1).

    Returns the bins' indices, nearest first, and their weights ``exp(-d^2 / (2 sigma^2))`` normalised
    to sum to one: the sparse form of the paper's target distribution ``Z``.

    Shape:
        - ab: ``(N, 2)``, bins: ``(Q, 2)``
        - Output: indices ``(N, k)`` int64 and weights ``(N, k)`` float
    """
    d2 = torch.cdist(ab.float(), bins) ** 2  # (N, Q)
    near_d2, idx = torch.topk(d2, k, dim=1, largest=False)  # (N, k), ascending
    # Softmax of -d^2/(2 sigma^2) is the normalised Gaussian and stays finite far from every bin.
    return idx, torch.softmax(-near_d2 / (2 * sigma**2), dim=1)


def smooth_prior(prior: torch.Tensor, bins: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """A distribution over bins smoothed by a Gaussian of ``sigma`` on the ab plane, renormalised.

    Shape:
        - prior: ``(Q,)``, bins: ``(Q, 2)`` -> ``(Q,)``
    """
    kernel = torch.exp(-torch.cdist(bins, bins) ** 2 / (2 * sigma**2))  # (Q, Q), symmetric
    smoothed = kernel @ prior
    return smoothed / smoothed.sum().clamp_min(torch.finfo(smoothed.dtype).tiny)


def rebalance_weights(prior: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Class-rebalancing weights ``w ∝ ((1 - lam) p + lam / Q)^-1`` with ``E_p[w] = 1`` (paper Eq. 4).

    ``prior`` is the (smoothed) empirical distribution ``p`` over the ``Q`` bins; ``lam = 1`` gives
    uniform weights (no rebalancing). An all-zero prior (nothing seen yet) also gives uniform weights.

    Shape:
        - prior: ``(Q,)`` -> ``(Q,)``
    """
    if not 0 < lam <= 1:
        raise ConfigError(f"the rebalancing lambda must be in (0, 1], got {lam!r}")
    q = prior.shape[0]
    total = prior.sum()
    p = torch.where(total > 0, prior / total.clamp_min(torch.finfo(prior.dtype).tiny), torch.full_like(prior, 1 / q))
    w = 1.0 / ((1 - lam) * p + lam / q)
    return w / (p * w).sum()


def annealed_mean(logits: torch.Tensor, bins: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
    """Annealed-mean point estimate of ab from bin logits (paper Eq. 5).

    ``f_T(z) = exp(log z / T) / sum exp(log z / T)`` re-weights the predicted distribution ``z`` (T = 1:
    its mean; T -> 0: its mode); the estimate is the mean of the bins under ``f_T(z)``. With
    ``z = softmax(logits)``, ``f_T(z) = softmax(logits / T)``.

    Shape:
        - logits: ``(..., Q)``, bins: ``(Q, 2)`` -> ``(..., 2)``
    """
    if temperature <= 0:
        raise ConfigError(f"the annealing temperature must be positive, got {temperature!r}")
    return torch.softmax(logits / temperature, dim=-1) @ bins


def rebalanced_cross_entropy(
    logits: torch.Tensor, idx: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor
) -> torch.Tensor:
    """Multinomial cross-entropy against soft targets, each pixel weighted (paper Eq. 2).

    Shape:
        - logits: ``(N, Q)``; idx, target: ``(N, k)`` sparse soft targets; pixel_weights: ``(N,)``
        - Output: scalar, the mean over pixels
    """
    logp = F.log_softmax(logits, dim=1).gather(1, idx)  # (N, k)
    return (pixel_weights * -(target * logp).sum(1)).mean()
