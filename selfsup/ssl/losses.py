"""Losses shared by several methods, as plain ``nn.Module``s (no Lightning imports).

- [0] CPC, 2018, https://arxiv.org/abs/1807.03748
- [1] CPC v2, 2019, https://arxiv.org/abs/1905.09272
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from selfsup.errors import ConfigError


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from every rank, keeping the autograd graph; a no-op without a process group.

    Backward sums the gradients every rank computed for this rank's part
    (``torch.distributed.nn.functional.all_gather``), so with DDP's gradient averaging the result is
    the exact gradient of the mean of the ranks' losses. Every rank must pass the same shape
    (train with ``drop_last=True``).

    Returns:
        The gathered tensor and the row where this rank's part starts in it.

    Shape:
        - x: ``(M, D)`` -> ``(world_size * M, D)``
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x)  # world_size x (M, D)
    return torch.cat(parts), dist.get_rank() * x.shape[0]  # (world_size * M, D)


def _weighted_ce(
    preds: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = preds @ candidates.T  # (n, D) @ (D, M) -> (n, M)
    if logits.element_size() < 4:  # half-precision logits from autocast: the softmax runs in float32
        logits = logits.float()
    loss = (F.cross_entropy(logits, labels, reduction="none") * weights).sum()
    # Last, so that checkpointing's recomputation (which stops at the last saved tensor) skips it.
    # amax is several times faster than argmax on CPU; a tie with the positive counts as correct.
    logits = logits.detach()
    correct = (logits.gather(1, labels[:, None]).squeeze(1) >= logits.amax(1)).sum()
    return loss, correct


def chunked_info_nce(
    preds: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_n weights[n] * CE(preds[n] @ candidates.T, labels[n])`` with bounded memory.

    With ``chunk_size`` the rows are processed ``chunk_size`` at a time under activation
    checkpointing, so at most one chunk's ``(chunk_size, M)`` logits is alive in forward or backward
    (backward recomputes each chunk's logits: one extra matmul).

    Returns:
        The weighted loss and the top-1 accuracy of the rows (detached).

    Shape:
        - preds: ``(N, D)``; candidates: ``(M, D)``; labels, weights: ``(N,)``
        - Output: two scalars
    """
    n = preds.shape[0]
    if chunk_size is None or chunk_size >= n:
        loss, correct = _weighted_ce(preds, candidates, labels, weights)
        return loss, correct.float() / n
    grad = torch.is_grad_enabled()
    losses, corrects = [], []
    for start in range(0, n, chunk_size):  # memory chunks, not patches: ceil(N / chunk_size) matmuls
        args = (
            preds[start : start + chunk_size],
            candidates,
            labels[start : start + chunk_size],
            weights[start : start + chunk_size],
        )
        out = checkpoint(_weighted_ce, *args, use_reentrant=False) if grad else _weighted_ce(*args)
        losses.append(out[0])
        corrects.append(out[1])
    return torch.stack(losses).sum(), torch.stack(corrects).sum().float() / n


class GridInfoNCE(nn.Module):
    """InfoNCE over a grid of patch vectors, as in CPC v2 (Hénaff et al. 2019), for all offsets at once.

    ``preds[r, k, b, i, j]`` predicts the target at ``(i, j) + offsets[k] * directions[r]`` of image
    ``b``: for the default direction ``(1, 0)`` ("down"), the positive of the prediction made from
    context row ``i`` for offset ``k`` is ``targets[b, i + k, j]``. Predictions whose target falls off
    the grid are dropped. The candidate set of every prediction is **all** ``B * Gh * Gw`` target
    vectors of the batch (all ranks' with ``gather_negatives``): the positive, the other positions
    of the same image and every position of every other image, as in the paper's pseudo-code
    (appendix A.2) -- not only the same position in other images. The logits are one matrix product
    of the valid predictions with the candidates and the loss is ``F.cross_entropy``; the loss is the
    mean over (direction, offset) pairs of the mean over that pair's predictions, so its value at
    initialisation is about ``log(B * Gh * Gw)``.

    - [0] CPC v2, 2019, https://arxiv.org/abs/1905.09272
    - [1] CPC, 2018, https://arxiv.org/abs/1807.03748

    Args:
        offsets: the prediction offsets ``k`` (positive ints), one per ``preds`` slice along dim 1.
        directions: unit steps ``(drow, dcol)`` on the grid, one per ``preds`` slice along dim 0.
        chunk_size: prediction rows per logits chunk (bounds memory, see :func:`chunked_info_nce`);
            ``None`` computes all logits at once.
        gather_negatives: under ``torch.distributed``, use the targets of all ranks as candidates.

    Shape:
        - preds: ``(R, K, B, Gh, Gw, T)`` with ``R = len(directions)``, ``K = len(offsets)``
        - targets: ``(B, Gh, Gw, T)``
        - Output: ``(loss, accuracy)`` scalars; the accuracy is detached

    >>> loss_fn = GridInfoNCE(offsets=(1, 2))
    >>> loss, acc = loss_fn(torch.randn(1, 2, 4, 5, 5, 16), torch.randn(4, 5, 5, 16))
    """

    def __init__(
        self,
        offsets: Sequence[int],
        directions: Sequence[tuple[int, int]] = ((1, 0),),
        chunk_size: int | None = None,
        gather_negatives: bool = False,
    ) -> None:
        super().__init__()
        if not offsets or any(int(k) < 1 for k in offsets):
            raise ConfigError(f"offsets must be a non-empty sequence of positive ints, got {offsets!r}")
        if not directions or any(tuple(d) not in ((1, 0), (-1, 0), (0, 1), (0, -1)) for d in directions):
            raise ConfigError(f"directions must be unit grid steps like (1, 0), got {directions!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"chunk_size must be positive or None, got {chunk_size!r}")
        self.offsets = tuple(int(k) for k in offsets)
        self.directions = tuple((int(d[0]), int(d[1])) for d in directions)
        self.chunk_size = chunk_size
        self.gather_negatives = gather_negatives
        self._tables: dict[tuple[int, int, torch.device], tuple[torch.Tensor, ...]] = {}

    def index_tables(
        self, gh: int, gw: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Valid predictions for a ``gh x gw`` grid, built once per grid shape and device.

        Returns:
            ``src``: each valid prediction's row in ``preds`` flattened as ``(R*K*Gh*Gw, ...)``;
            ``dst``: its target's position ``i * Gw + j``; ``weight``: ``1 / (R*K * n_rk)``, where
            ``n_rk`` counts the valid positions of its (direction, offset) pair. All ``(V,)``.
        """
        key = (gh, gw, device)
        if key not in self._tables:
            steps = torch.tensor(self.directions)  # (R, 2)
            ks = torch.tensor(self.offsets)  # (K,)
            ii, jj = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # (Gh, Gw) each
            ti = ii + ks[None, :, None, None] * steps[:, 0, None, None, None]  # (R, K, Gh, Gw)
            tj = jj + ks[None, :, None, None] * steps[:, 1, None, None, None]  # (R, K, Gh, Gw)
            valid = (ti >= 0) & (ti < gh) & (tj >= 0) & (tj < gw)  # (R, K, Gh, Gw)
            counts = valid.sum(dim=(2, 3))  # (R, K)
            if (counts == 0).any():
                raise ConfigError(
                    f"a {gh}x{gw} grid has no target for offset(s) {self.offsets}: "
                    "use smaller offsets or a larger grid"
                )
            weight = (1.0 / (counts.numel() * counts.float()))[:, :, None, None].expand_as(
                valid
            )  # (R, K, Gh, Gw)
            src = valid.flatten().nonzero().squeeze(1)  # (V,) rows of (R*K*Gh*Gw)
            dst = (ti * gw + tj).flatten()[src]  # (V,)
            self._tables[key] = (src.to(device), dst.to(device), weight.flatten()[src].to(device))
        return self._tables[key]

    def forward(self, preds: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, k, b, gh, gw, t = preds.shape
        if (r, k) != (len(self.directions), len(self.offsets)) or targets.shape != (b, gh, gw, t):
            raise ConfigError(
                f"expected preds (R={len(self.directions)}, K={len(self.offsets)}, B, Gh, Gw, T) and targets "
                f"(B, Gh, Gw, T), got {tuple(preds.shape)} and {tuple(targets.shape)}"
            )
        src, dst, weight = self.index_tables(gh, gw, preds.device)
        p = gh * gw
        # (R, K, B, Gh, Gw, T) -> (R*K*Gh*Gw, B, T) -> valid rows (V, B, T)
        rows = preds.permute(0, 1, 3, 4, 2, 5).reshape(r * k * p, b, t).index_select(0, src)
        labels = (
            dst[:, None] + p * torch.arange(b, device=preds.device)[None, :]
        )  # (V, B): b * P + i * Gw + j
        weights = (weight / b)[:, None].expand(-1, b)  # (V, B)
        candidates = targets.reshape(b * p, t)  # (B, Gh, Gw, T) -> (B*P, T)
        if self.gather_negatives:
            candidates, start = all_gather_with_grad(candidates)  # (world*B*P, T)
            labels = labels + start
        return chunked_info_nce(
            rows.reshape(-1, t), candidates, labels.reshape(-1), weights.reshape(-1), self.chunk_size
        )  # rows (V, B, T) -> (V*B, T)
