"""Linear probe on cached features: multinomial logistic regression, L2 strength chosen on held-out labels.

The protocol is the one of Kolesnikov et al. (revisiting self-supervised learning) and CPC v2: features
of a frozen encoder are standardised with the training set's mean and standard deviation, a
multinomial logistic regression is fitted for each L2 strength of a small grid on a stratified part of
the training labels and scored on the rest, and the best strength is refitted on all training labels.

The objective is exactly scikit-learn's ``LogisticRegression(C=C)`` (multinomial, unpenalised bias)::

    mean_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||_F^2,     C = 1 / (weight_decay * N)

so a probe here and scikit-learn at that ``C`` have the same minimiser. It is solved by full-batch
L-BFGS (strong-Wolfe line search) in torch, warm-started along the grid from the strongest penalty to the
weakest, or by mini-batch Adam on the same objective when a ``batch_size`` is given; on the GPU when the
features live there or ``device="cuda"``.

Scale: the objective and its gradient are accumulated over row chunks (float64 sums across chunks), so
no (N, C) logit or one-hot array and no second copy of the training features is ever made: features are
read in their stored dtype (a float16 cache stays float16) from wherever they live (a memory map
included), standardised and converted chunk by chunk into one reused cache-sized buffer. A training set
small enough (twice its float32 size within ``resident_bytes``: 256 MiB on the CPU, 60% of the free
memory on a GPU) is copied once, standardised, to the fitting device. L-BFGS stops when the largest gradient entry falls below ``tol`` times its value at ``W = 0``, a
scale-free rule (gradients shrink about as 1/C, so an absolute threshold under-fits at 1000 classes),
and every fit takes at least ``min_iter`` iterations, so a warm start cannot stall.

Threads: sums across chunks are float64 and in a fixed order, so the thread count only enters through
float32 rounding inside one chunk's matrix products. L-BFGS may then take an iteration more or less;
the chosen strength and the accuracies agree (tested: 1 vs 2 threads give the same strength and test
top-1 within 0.1 point; a DDP sweep with one thread per rank equals a one-thread process exactly).

Data-parallel (``linear_probe(..., shard=Shard.process_group())`` on every rank): one fit too big for one
device is spread over processes (GPUs, nodes). Each rank reads only its block of the rows; every row sum
(standardisation statistics, loss and gradient, hit counts) is all-reduced in float64, so all ranks take
the same L-BFGS steps with the same code as one process. Only the float32 rounding inside a chunk changes
(its boundaries follow the shard's), as with the thread count: tested on 2 gloo ranks, the same strength
and accuracies as one process and final weights within 1e-5 (hold-out losses within 1e-3 relative, the
search's stopping tolerance).

- [0] Revisiting Self-Supervised Visual Representation Learning, 2019, https://arxiv.org/abs/1901.09005
- [1] CPC v2, 2019, https://arxiv.org/abs/1905.09272
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.errors import ConfigError
from selfsup.eval.shard import Shard
from selfsup.progress import make_progress

ArrayLike = Union[torch.Tensor, np.ndarray]

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = tuple(10.0**e for e in range(-6, 1))
"""L2 strengths tried by default (1e-6 ... 1), on standardised features and the mean cross-entropy."""

DEFAULT_WEIGHT_DECAY = 1e-3
"""L2 strength used when no hold-out is possible (a class with fewer than 2 training labels)."""

CPU_RESIDENT_BYTES = 2**28
"""CPU memory a standardised float32 copy of the training rows (and its hold-out parts) may use: a set
whose copy, twice over, fits is held resident, a larger one is streamed from where it is stored. Kept
small on purpose: streaming in cache-sized chunks through one reused buffer costs about 1.0-1.3x a
resident copy per L-BFGS evaluation (``benchmarks/eval_scale.py --tasks evals``), so a larger resident
copy would buy little speed for a second copy of the features in memory."""

LBFGS_HISTORY = 10
"""L-BFGS correction pairs kept (scipy's and so scikit-learn's default ``maxcor``). Each pair is two
``D x C + C`` float32 vectors, whatever N: 165 MiB at D=2048, C=1000, the largest fixed cost of a probe."""

_CHUNK_FLOATS_CPU = 2**21
"""Floats in one chunk's (rows x max(D, C)) block on the CPU: 8 MiB, so a standardised block is still in
cache when the matrix products read it (64 MiB chunks made every streamed evaluation 2-3x slower at
D = 2048 and 5632, C = 10; 1024 rows at D = 2048, C = 1000 are within 5% of the best chunk there)."""

_CHUNK_FLOATS_CUDA = 2**26
"""The same on a GPU (256 MiB): large kernels, and the caching allocator makes a new block cheap."""


@dataclass
class Split:
    """Validated features and labels of a train/test split, labels mapped to ``0 .. C-1``.

    Attributes:
        train_x: (N, D) training features, as stored (float16/32/64; never copied to float32 here).
        train_y: (n,) int64 class indices of the used training rows.
        test_x: (M, D) test features, as stored.
        test_y: (M,) int64 test class indices (None when no test labels were given).
        classes: (C,) int64 original label of each class index, sorted.
        rows: (n,) sorted int64 indices of the used training rows into ``train_x`` (None: all N rows).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    classes: torch.Tensor
    rows: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return int(self.classes.numel())


def as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """A torch view of a tensor or numpy array (no copy where possible), or a tensor of a list."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        if not x.flags.writeable:
            # A read-only memory map (the feature cache): torch only reads it, so silence its warning.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(x)
        return torch.from_numpy(x)
    raise ConfigError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")


def as_labels(y: ArrayLike, name: str) -> torch.Tensor:
    """Integer labels as an int64 1-D tensor; raise ConfigError for other dtypes or shapes."""
    y = as_tensor(y, name)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if y.ndim != 1:
        raise ConfigError(f"{name} must be 1-D (one label per sample), got shape {tuple(y.shape)}")
    return y.long()


def as_features(x: ArrayLike, name: str, check_finite: bool = True) -> torch.Tensor:
    """Features as a 2-D floating tensor in their stored precision (integers become float32).

    Floating features are not converted (a float16 memory map stays float16: consumers convert chunk by
    chunk). With ``check_finite`` every value is checked, chunk by chunk; raise ConfigError otherwise.
    """
    x = as_tensor(x, name)
    if x.ndim != 2:
        raise ConfigError(f"{name} must be 2-D (samples, features), got shape {tuple(x.shape)}")
    if not (
        x.dtype.is_floating_point
        or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    ):
        raise ConfigError(f"{name} must be numeric, got dtype {x.dtype}")
    if not x.dtype.is_floating_point:
        x = x.float()
    if check_finite and x.numel():
        rows = max(1, 2**24 // max(1, x.shape[1]))
        if not all(bool(torch.isfinite(c).all()) for c in x.split(rows)):
            bad = sum(int((~torch.isfinite(c)).any(dim=1).sum()) for c in x.split(rows))
            raise ConfigError(f"{name} has NaN or inf values in {bad} of {x.shape[0]} rows")
    return x


def check_split(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike | None,
    num_classes: int | None = None,
    *,
    train_rows: ArrayLike | None = None,
    check_finite: bool = True,
) -> Split:
    """Validate a train/test split of features and labels; map labels to class indices.

    Args:
        train_x: (N, D) training features.
        train_y: (N,) integer training labels.
        test_x: (M, D) test features.
        test_y: (M,) integer test labels, or None when only the test features are needed.
        num_classes: when given, labels must lie in ``[0, num_classes)`` and the classes are
            ``0 .. num_classes-1`` (some may have no training sample); otherwise the classes are the
            distinct labels of the used training rows.
        train_rows: indices of the training rows to use (a label subset), None for all; the rows are
            read from ``train_x`` where it lives, never gathered into a copy here.
        check_finite: check every feature value (False when the caller already did, e.g. a sweep).

    Returns:
        The validated :class:`Split`.

    Raises:
        ConfigError: count mismatch, differing feature dims, NaN/inf features, fewer than 2 classes, a
            training row index out of range, or a test label that no training sample has.
    """
    tx, ty = as_features(train_x, "train_x", check_finite), as_labels(train_y, "train_y")
    vx = as_features(test_x, "test_x", check_finite)
    vy = ty[:0] if test_y is None else as_labels(test_y, "test_y")
    pairs = ((tx, ty, "train"),) if test_y is None else ((tx, ty, "train"), (vx, vy, "test"))
    if vx.shape[0] == 0:
        raise ConfigError("test split is empty")
    for x, y, split in pairs:
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"{split} has {x.shape[0]} feature rows but {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise ConfigError(f"{split} split is empty")
    if tx.shape[1] != vx.shape[1]:
        raise ConfigError(f"train features have {tx.shape[1]} dims but test features have {vx.shape[1]}")
    rows = None
    if train_rows is not None:
        rows = torch.unique(as_labels(train_rows, "train_rows").cpu())  # sorted, distinct
        if rows.numel() == 0:
            raise ConfigError("train split is empty (no training row selected)")
        if int(rows[0]) < 0 or int(rows[-1]) >= tx.shape[0]:
            raise ConfigError(f"train_rows must lie in [0, {tx.shape[0]}), got [{int(rows[0])}, {int(rows[-1])}]")
        ty = ty[rows.to(ty.device)]
    ty, vy = ty.to(tx.device), vy.to(vx.device)
    present = torch.unique(ty)
    if num_classes is None:
        classes = present
    else:
        both = torch.cat([ty, vy.to(ty.device)])
        lo, hi = int(both.min()), int(both.max())
        if lo < 0 or hi >= num_classes:
            raise ConfigError(
                f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, got [{lo}, {hi}]"
            )
        classes = torch.arange(num_classes, device=ty.device)
    if classes.numel() < 2 or present.numel() < 2:
        raise ConfigError(f"need at least 2 classes in the training labels, got {present.numel()}")
    test_classes = torch.unique(vy).to(present.device)
    missing = test_classes[~torch.isin(test_classes, present)]
    if missing.numel():
        shown = ", ".join(str(int(c)) for c in missing[:10]) + (", ..." if missing.numel() > 10 else "")
        raise ConfigError(f"test labels {{{shown}}} ({missing.numel()} classes) have no training sample")
    train_idx = torch.searchsorted(classes, ty)
    test_idx = None if test_y is None else torch.searchsorted(classes.to(vy.device), vy)
    return Split(tx, train_idx, vx, test_idx, classes, rows)


def resolve_device(device: str | torch.device | None, *tensors: torch.Tensor) -> torch.device:
    """``device`` when given, else the CUDA device of the first tensor on one, else the CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for, but torch sees no CUDA GPU here")
        return device
    for t in tensors:
        if t.is_cuda:
            return t.device
    return torch.device("cpu")


def topk_hits(scores: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of rows whose target is among the top-k scores, for each k (capped at the class count).

    Ties are ranked by the smaller class index (stable sort), so the result is deterministic.

    Shape:
        scores: (M, C); target: (M,) class indices.
    """
    target = target.to(scores.device)[:, None]  # (M, 1)
    own = scores.gather(1, target)  # (M, 1)
    cols = torch.arange(scores.shape[1], device=scores.device)
    # rank of the target: classes scored higher, plus equal-scored classes of smaller index
    rank = (scores > own).sum(dim=1) + ((scores == own) & (cols < target)).sum(dim=1)  # (M,)
    return [int((rank < k).sum()) for k in ks]


def topk_accuracy(scores: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent; ``k`` is capped at the number of classes (top-5 of 3 classes is 100).

    Ties are ranked by the smaller class index (stable sort), so the result is deterministic.

    Shape:
        scores: (M, C); target: (M,) class indices.
    """
    return [100.0 * h / scores.shape[0] for h in topk_hits(scores, target, ks)]


@dataclass
class LinearClassifier:
    """A fitted probe: standardisation statistics and the multinomial logistic regression on top.

    Attributes:
        mean: (D,) training-feature mean.
        std: (D,) training-feature standard deviation (1 where a feature is constant).
        weight: (D, C) weights on standardised features.
        bias: (C,) biases.
        classes: (C,) original label of each output.
    """

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    classes: torch.Tensor

    @torch.no_grad()
    def logits(self, x: ArrayLike) -> torch.Tensor:
        """Class logits (M, C) of raw (unstandardised) features (M, D), computed in chunks."""
        x = as_features(x, "x")
        rows = _chunk_rows(x.shape[1], self.weight.shape[1], self.weight.device)
        out = [
            torch.addmm(self.bias, _standardise(chunk.to(self.weight.device).float(), self.mean, self.std),
                        self.weight)
            for chunk in x.split(rows)
        ]
        return torch.cat(out)

    def predict(self, x: ArrayLike) -> torch.Tensor:
        """Predicted original labels (M,) of raw features (M, D)."""
        return self.classes[self.logits(x).argmax(dim=1).to(self.classes.device)]


def _standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def _chunk_rows(d: int, c: int, device: torch.device) -> int:
    """Rows per chunk so that a chunk's features and logits stay within the chunk budget."""
    floats = _CHUNK_FLOATS_CUDA if device.type == "cuda" else _CHUNK_FLOATS_CPU
    return max(1, floats // max(1, d, c))


def _row_blocks(x: torch.Tensor, rows: torch.Tensor | None, chunk: int):
    """Raw blocks of ``x``'s rows ``rows`` (all when None), ``chunk`` rows at a time, as stored and where stored.

    Without ``rows`` the blocks are views (a memory map is only read); with ``rows`` each block is
    gathered, so at most one chunk is ever copied.
    """
    if rows is None:
        yield from x.split(chunk)
    else:
        for part in rows.split(chunk):
            yield x[part.to(x.device)]


@dataclass
class _Rows:
    """The training rows a fit sees: raw features where they live, labels, standardisation, chunking.

    ``x`` is never modified: a block is converted to float32 and standardised into a new tensor on
    ``device`` (unless ``stats`` is None: already standardised float32 on ``device``).

    Under a data-parallel ``shard`` these are this rank's rows only; ``total`` is the row count over all
    ranks (summed at construction: a collective, so every rank builds its rows in the same order).
    """

    x: torch.Tensor  # (N, D) as stored
    y: torch.Tensor  # (n,) class indices of the used rows, on device
    rows: torch.Tensor | None  # (n,) sorted row indices into x, None: all N rows
    stats: tuple[torch.Tensor, torch.Tensor] | None
    device: torch.device
    chunk: int
    shard: Shard = field(default_factory=Shard)
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = self.shard.total(self.n, self.device)

    @property
    def n(self) -> int:
        """Rows held here (this rank's share)."""
        return int(self.y.shape[0])

    def blocks(self):
        """``(x_block, y_block)``: float32 standardised features (b, D) on ``device`` and their labels (b,).

        A block is valid until the next one is drawn: streamed blocks are standardised into one buffer
        reused for every chunk (a fresh 8 MiB allocation per chunk costs page faults on every pass).
        """
        if self.stats is None:  # resident: views of the standardised copy
            start = 0
            for xb in self.x.split(self.chunk):
                yield xb, self.y[start : start + xb.shape[0]]
                start += xb.shape[0]
            return
        mean, std = self.stats
        buf = torch.empty(min(self.chunk, max(1, self.n)), self.x.shape[1], device=self.device)
        start = 0
        for xb in _row_blocks(self.x, self.rows, self.chunk):
            out = buf[: xb.shape[0]]
            # out of place into the buffer: the stored rows (a read-only memory map, say) stay untouched
            torch.sub(xb.to(self.device, non_blocking=True), mean, out=out).div_(std)
            yield out, self.y[start : start + xb.shape[0]]
            start += xb.shape[0]

    def subset(self, idx: torch.Tensor) -> _Rows:
        """The rows ``idx`` (sorted positions among this set's rows)."""
        if self.stats is None:  # resident: a contiguous standardised tensor, so take a (smaller) copy
            return _Rows(self.x[idx.to(self.x.device)], self.y[idx.to(self.y.device)], None, None,
                         self.device, self.chunk, self.shard)
        base = torch.arange(self.x.shape[0]) if self.rows is None else self.rows
        return _Rows(self.x, self.y[idx.to(self.y.device)], base[idx.cpu()], self.stats, self.device, self.chunk,
                     self.shard)


def _mean_std(
    x: torch.Tensor, device: torch.device, rows: torch.Tensor | None = None, shard: Shard | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (population) of the rows ``rows``, accumulated in float64 over row chunks.

    Under a data-parallel ``shard`` the rows are this rank's: the count, the sum and then the sum of
    squared deviations from the global mean (two passes, as in one process) are summed over the ranks.
    """
    shard = Shard() if shard is None else shard
    n = shard.total(x.shape[0] if rows is None else rows.numel(), device)
    chunk = max(1, 2**22 // max(1, x.shape[1]))  # float64 chunks of 32 MB, whatever the feature size
    s = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    for block in _row_blocks(x, rows, chunk):
        s += block.to(device, torch.float64).sum(0)
    mean = shard.sum_(s) / n
    ss = torch.zeros_like(s)
    for block in _row_blocks(x, rows, chunk):
        ss += (block.to(device, torch.float64) - mean).square().sum(0)
    std = (shard.sum_(ss) / n).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean.float(), std.float()


def _resident_budget(device: torch.device, resident_bytes: int | None) -> int:
    """Bytes a resident standardised copy of the training rows may take on ``device`` (per process):
    ``resident_bytes`` when given; on a GPU 60% of its free memory; on the CPU :data:`CPU_RESIDENT_BYTES`."""
    if resident_bytes is not None:
        return int(resident_bytes)
    if device.type == "cuda":
        return int(0.6 * torch.cuda.mem_get_info(device)[0])
    return CPU_RESIDENT_BYTES


def _prepare_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor | None,
    stats: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
    num_classes: int,
    resident_bytes: int | None,
    shard: Shard | None = None,
) -> _Rows:
    """The fit's view of the training rows: one standardised float32 copy on ``device`` when it is small
    enough (``resident_bytes``), else the stored rows streamed chunk by chunk. Under a ``shard``: this
    rank's rows, and the budget is this rank's."""
    shard = Shard() if shard is None else shard
    n, d = (x.shape[0] if rows is None else rows.numel()), x.shape[1]
    chunk = _chunk_rows(d, num_classes, device)
    # twice the copy: the hold-out search takes its fit and held-out parts as copies of the resident set
    if stats is not None and 0 < n and 2 * n * d * 4 <= _resident_budget(device, resident_bytes):
        xs, start = torch.empty(n, d, device=device), 0  # filled chunk by chunk: never a second list of blocks
        for block in _row_blocks(x, rows, chunk):
            torch.sub(block.to(device), stats[0], out=xs[start : start + block.shape[0]]).div_(stats[1])
            start += block.shape[0]
        return _Rows(xs, y.to(device), None, None, device, chunk, shard)
    return _Rows(x, y.to(device), rows, stats, device, chunk, shard)


def _objective(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, weight_decay: float
) -> torch.Tensor:
    """Mean cross-entropy plus ``weight_decay / 2 * ||W||^2`` (scikit-learn's objective divided by C*N)."""
    return F.cross_entropy(torch.addmm(b, x, w), y) + 0.5 * weight_decay * w.square().sum()


@torch.no_grad()
def _loss_and_grad(
    data: _Rows, w: torch.Tensor, b: torch.Tensor, weight_decay: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_objective` over all of ``data``'s rows and its gradient, by hand, chunk by chunk.

    The gradient of the mean cross-entropy is ``x^T (softmax - onehot) / N``; computing it as
    ``(P^T x)^T`` reads ``x`` row-major, which BLAS does about twice as fast as ``x^T P``. Sums across
    chunks are float64, so the result does not depend on the chunking; no (N, C) array is formed. Under
    a data-parallel shard each rank's float64 sums are summed over the ranks (one all-reduce of
    ``1 + C + C * D`` numbers) and divided by the global row count, so every rank gets the same result.

    Shape:
        w: (D, C); b: (C,); returns a scalar loss, (D, C) and (C,) gradients.
    """
    d, c = w.shape
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    gw = torch.zeros(c, d, dtype=torch.float64, device=w.device)
    gb = torch.zeros(c, dtype=torch.float64, device=w.device)
    for xb, yb in data.blocks():
        logits = torch.addmm(b, xb, w)  # (B, D) @ (D, C) -> (B, C)
        target = logits.gather(1, yb[:, None])  # (B, 1)
        m = logits.amax(dim=1, keepdim=True)  # (B, 1)
        e = logits.sub_(m).exp_()  # (B, C), in place
        s = e.sum(dim=1, keepdim=True)  # (B, 1)
        loss += (s.log() + m - target).double().sum()
        p = e.div_(s)  # (B, C) softmax
        p.scatter_add_(1, yb[:, None], torch.full_like(s, -1.0))  # softmax - onehot
        gw += torch.mm(p.t(), xb)  # (C, B) @ (B, D) -> (C, D), summed in float64
        gb += p.sum(dim=0)
    if data.shard.world > 1:
        packed = data.shard.sum_(torch.cat([loss.view(1), gb, gw.view(-1)]))  # (1 + C + C*D,)
        loss, gb, gw = packed[0], packed[1 : c + 1], packed[c + 1 :].view(c, d)
    n = data.total
    loss = loss / n + 0.5 * weight_decay * w.double().square().sum()
    grad_w = gw.t().div(n).float().add_(w, alpha=weight_decay)  # (C, D) -> (D, C)
    return loss, grad_w.contiguous(), gb.div(n).float()


def gradient_scale(data: _Rows, num_classes: int) -> float:
    """Largest gradient entry of the mean cross-entropy at ``W = 0, b = 0``: the scale of the stopping rule."""
    d = data.x.shape[1]
    zeros_w = torch.zeros(d, num_classes, device=data.device)
    _, gw, gb = _loss_and_grad(data, zeros_w, zeros_w[0], 0.0)
    return max(float(gw.abs().max()), float(gb.abs().max()), 1e-30)


@dataclass
class FitInfo:
    """How a fit ended: solver, iterations (L-BFGS iterations or Adam steps), evaluations, convergence."""

    solver: str
    iterations: int
    evaluations: int
    converged: bool | None  # None for the mini-batch solver (no stopping rule: a fixed number of epochs)
    tol_abs: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"solver": self.solver, "iterations": self.iterations, "evaluations": self.evaluations,
                "converged": self.converged}


def _fit_lbfgs(
    data: _Rows,
    w: torch.Tensor,
    b: torch.Tensor,
    weight_decay: float,
    max_iter: int,
    tol: float,
    min_iter: int,
    scale: float,
) -> FitInfo:
    """Full-batch L-BFGS (strong-Wolfe line search) until ``max|grad| <= tol * scale``.

    ``scale`` is :func:`gradient_scale` of the data (the gradient at zero, independent of the start), so
    a warm start is judged by the cold-start yardstick. The first ``min_iter`` iterations ignore the
    gradient test: a warm start whose gradient is already small still moves towards its own optimum.
    """
    tol_abs = tol * scale
    min_iter = min(min_iter, max_iter)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=min_iter,
        max_eval=int(min_iter * 1.25) + 1,
        history_size=LBFGS_HISTORY,
        tolerance_grad=-1.0,  # never met: the first phase always runs min_iter iterations
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        loss, w.grad, b.grad = _loss_and_grad(data, w, b, weight_decay)
        return loss

    if min_iter > 0:
        opt.step(closure)
    state = opt.state[w]
    done = state.get("n_iter", 0)
    if done < max_iter:
        group = opt.param_groups[0]
        group.update(max_iter=max_iter - done, max_eval=int((max_iter - done) * 1.25) + 1, tolerance_grad=tol_abs)
        opt.step(closure)
    iters = int(state.get("n_iter", 0))
    return FitInfo("lbfgs", iters, int(state.get("func_evals", 0)), iters < max_iter, tol_abs)


def _fit_minibatch(
    data: _Rows,
    w: torch.Tensor,
    b: torch.Tensor,
    weight_decay: float,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
) -> FitInfo:
    """Adam on the same objective (the L2 term is in the loss, not decoupled) over shuffled batches.

    Each batch's rows are gathered (in ascending order, kind to a memory map) from wherever ``data``
    keeps them, moved to ``w``'s device and standardised there.
    """
    n = data.n
    base = None if data.rows is None else data.rows
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.Adam([w, b], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            idx = idx.sort().values
            src = idx if base is None else base[idx]
            xb = data.x[src.to(data.x.device)].to(w.device, non_blocking=True)
            if data.stats is not None:
                xb = _standardise(xb.float(), *data.stats)
            loss = _objective(xb, data.y[idx.to(data.y.device)], w, b, weight_decay)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            sched.step()
    return FitInfo("adam", epochs * steps_per_epoch, epochs * steps_per_epoch, None)


def _fit(
    data: _Rows,
    num_classes: int,
    weight_decay: float,
    init: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    max_iter: int,
    tol: float,
    min_iter: int,
    scale: float | None,
    batch_size: int | None,
    epochs: int,
    lr: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, FitInfo]:
    d = data.x.shape[1]
    w = torch.zeros(d, num_classes, device=data.device)
    b = torch.zeros(num_classes, device=data.device)
    if init is not None:
        w.copy_(init[0])
        b.copy_(init[1])
    w.requires_grad_(True)
    b.requires_grad_(True)
    if batch_size is None:
        scale = gradient_scale(data, num_classes) if scale is None else scale
        info = _fit_lbfgs(data, w, b, weight_decay, max_iter, tol, min_iter, scale)
    else:
        info = _fit_minibatch(data, w, b, weight_decay, batch_size, epochs, lr, seed)
    return w.detach(), b.detach(), info


def fit_logistic(
    x: ArrayLike,
    y: ArrayLike,
    weight_decay: float,
    *,
    num_classes: int | None = None,
    max_iter: int = 500,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    epochs: int = 30,
    lr: float = 3e-2,
    tol: float = 1e-4,
    min_iter: int = 5,
    seed: int = 0,
    return_info: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, FitInfo]:
    """Fit multinomial logistic regression ``softmax(x W + b)`` with an L2 penalty on ``W`` (not ``b``).

    Minimises ``mean_i CE(x_i W + b, y_i) + weight_decay / 2 * ||W||_F^2``, the minimiser of
    scikit-learn's ``LogisticRegression(C=1 / (weight_decay * N))``. ``x`` is used as given (no
    standardisation; :func:`linear_probe` does that), read chunk by chunk in its stored dtype.

    Args:
        x: (N, D) features.
        y: (N,) class indices in ``[0, num_classes)``.
        weight_decay: L2 strength (> 0; use a tiny value for an almost unpenalised fit).
        num_classes: number of outputs; ``max(y) + 1`` when None.
        max_iter: L-BFGS iterations (full batch).
        init: warm start ``(W, b)``.
        device: where to fit; the device of ``x`` when None.
        batch_size: when given, fit by mini-batch Adam (``epochs`` passes, cosine-decayed ``lr``) instead
            of full-batch L-BFGS.
        epochs: passes of the mini-batch fit.
        lr: peak learning rate of the mini-batch fit.
        tol: L-BFGS stops when the largest gradient entry is below ``tol`` times its value at zero.
        min_iter: L-BFGS iterations always taken, whatever the gradient at the start.
        seed: seed of the mini-batch order.
        return_info: also return the :class:`FitInfo` (iterations, convergence).

    Returns:
        ``(W, b)``: (D, C) weights and (C,) biases, on ``device`` (and the :class:`FitInfo`).

    Raises:
        ConfigError: bad shapes, labels out of range, non-positive ``weight_decay`` or ``max_iter``.
    """
    x = as_features(x, "x")
    y = as_labels(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"x has {x.shape[0]} rows but y has {y.shape[0]} labels")
    if not weight_decay > 0 or not math.isfinite(weight_decay):
        raise ConfigError(f"weight_decay must be a positive finite number, got {weight_decay!r}")
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter!r}")
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ConfigError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    dev = resolve_device(device, x)
    data = _Rows(x, y.to(dev), None, None, dev, _chunk_rows(x.shape[1], num_classes, dev))
    if x.dtype != torch.float32 or x.device != dev:  # blocks() converts only with stats: give unit ones
        data.stats = (torch.zeros(x.shape[1], device=dev), torch.ones(x.shape[1], device=dev))
    w, b, info = _fit(data, num_classes, weight_decay, init, max_iter=max_iter, tol=tol, min_iter=min_iter,
                      scale=None, batch_size=batch_size, epochs=epochs, lr=lr, seed=seed)
    return (w, b, info) if return_info else (w, b)


def stratified_holdout(
    y: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Split sample indices into (fit, held-out) parts holding out ``fraction`` of every class.

    Each class keeps at least one sample on each side; None when a class has fewer than 2 samples.
    """
    y_np = y.cpu().numpy()
    counts = np.bincount(y_np)
    counts = counts[counts > 0]
    if counts.min() < 2:
        return None
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y_np))
    perm = perm[np.argsort(y_np[perm], kind="stable")]  # grouped by class, random within class
    cls_sorted = y_np[perm]
    starts = np.searchsorted(cls_sorted, cls_sorted, side="left")
    rank = np.arange(len(perm)) - starts  # rank of each sample inside its class
    n_c = np.bincount(y_np)[cls_sorted]
    n_val = np.clip(np.rint(fraction * n_c), 1, n_c - 1)
    held = rank < n_val
    return torch.from_numpy(np.sort(perm[~held])), torch.from_numpy(np.sort(perm[held]))


def _check_finite_rows(shard: Shard, device: torch.device, *parts: tuple[str, torch.Tensor, torch.Tensor | None]):
    """Raise ConfigError on every rank when any rank's rows of a ``(name, x, rows)`` part hold NaN or inf."""
    bad = torch.zeros(len(parts), dtype=torch.float64, device=device)
    for i, (_, x, rows) in enumerate(parts):
        for block in _row_blocks(x, rows, max(1, 2**24 // max(1, x.shape[1]))):
            bad[i] += int((~torch.isfinite(block)).any(dim=1).sum())
    for (name, _, _), count in zip(parts, shard.sum_(bad).tolist(), strict=True):
        if count:
            raise ConfigError(f"{name} has NaN or inf values in {int(count)} rows")


@torch.no_grad()
def _score(data: _Rows, w: torch.Tensor, b: torch.Tensor, ks: tuple[int, ...]) -> tuple[list[float], float]:
    """Top-k accuracies (percent) and mean cross-entropy of ``(w, b)`` on ``data``, chunk by chunk."""
    hits = [0] * len(ks)
    ce = 0.0
    for xb, yb in data.blocks():
        logits = torch.addmm(b, xb, w)  # (B, C)
        hits = [h + n for h, n in zip(hits, topk_hits(logits, yb, ks), strict=True)]
        ce += float(F.cross_entropy(logits, yb, reduction="sum"))
    if data.shard.world > 1:
        sums = data.shard.sum_(torch.tensor([*hits, ce], dtype=torch.float64, device=data.device))
        hits, ce = [round(h) for h in sums[:-1].tolist()], float(sums[-1])
    return [100.0 * h / data.total for h in hits], ce / data.total


def linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    *,
    train_rows: ArrayLike | None = None,
    weight_decays: tuple[float, ...] | list[float] | None = None,
    val_fraction: float = 0.2,
    max_iter: int = 500,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    resident_bytes: int | None = None,
    epochs: int = 30,
    lr: float = 3e-2,
    default_weight_decay: float = DEFAULT_WEIGHT_DECAY,
    patience: int | None = 2,
    tol: float = 1e-4,
    path_tol: float | None = None,
    min_iter: int = 5,
    seed: int = 0,
    check_finite: bool = True,
    return_model: bool = False,
    shard: Shard | None = None,
    progress: bool | str = False,
) -> dict[str, Any]:
    """Linear evaluation of frozen features: standardise, choose the L2 strength on held-out labels, refit.

    Features are standardised with the training mean and std. For each strength in ``weight_decays``
    (strongest first, each fit warm-started from the previous one) a multinomial logistic regression is
    fitted on ``1 - val_fraction`` of every class's training labels and scored on the rest; the strength
    with the best held-out top-1 (ties: the lower held-out cross-entropy) is refitted on all training
    labels, warm-started from its hold-out fit. Held-out accuracy is taken to be unimodal in the
    strength, so the path stops once ``patience`` successive strengths have not beaten the best (the
    weakest penalties, which cost the most iterations, are then skipped). When a class has fewer than 2
    training labels, or the grid has one value, or ``val_fraction`` is 0, ``default_weight_decay`` (or the
    single grid value) is used without hold-out.

    Data-parallel (``shard``, e.g. ``Shard.process_group()`` on every rank of a torch.distributed job,
    one GPU each): every rank calls this with the same arguments (the whole feature arrays, typically the
    same memory map, and all labels) and reads only its contiguous block of the used training rows and of
    the test rows. The standardisation statistics, every loss and gradient evaluation, and the held-out
    and test hit counts are summed over the ranks, so all ranks take the same L-BFGS steps and return the
    same result. The hold-out split is drawn from all labels (which every rank holds) by the same rule as
    in one process, so the same strength is chosen. The result equals one process's up to float32
    rounding inside a chunk (chunk boundaries move with the shard boundaries); tested on 2 gloo ranks:
    same strength and accuracies, weights within 1e-5 of each other. Mini-batch fits (``batch_size``)
    run in one process only.

    Protocol of [0] and [1]; the objective equals scikit-learn's ``LogisticRegression(C=1/(wd*N))``.

    - [0] Revisiting Self-Supervised Visual Representation Learning, 2019, https://arxiv.org/abs/1901.09005
    - [1] CPC v2, 2019, https://arxiv.org/abs/1905.09272

    Args:
        train_x: (N, D) training features (torch or numpy, float16/32, a memory map included; CUDA tensors
            are probed on their GPU). Never copied whole: see the module docstring.
        train_y: (N,) integer training labels.
        test_x: (M, D) test features.
        test_y: (M,) integer test labels; every one must occur in the used training labels.
        train_rows: indices of the training rows to use (a label budget), None for all.
        weight_decays: L2 grid; :data:`DEFAULT_WEIGHT_DECAYS` (1e-6 ... 1) when None.
        val_fraction: fraction of each class held out to choose the strength.
        max_iter: L-BFGS iterations per fit.
        device: where to fit; the features' device when None.
        batch_size: mini-batch fit with this batch size (Adam, ``epochs`` passes) instead of L-BFGS.
        resident_bytes: memory for a standardised float32 copy of the training rows on ``device`` (and its
            hold-out parts: twice the rows' size); larger sets are streamed chunk by chunk. None: 256 MiB
            on the CPU, 60% of free memory on a GPU.
        epochs: passes of the mini-batch fit.
        lr: peak learning rate of the mini-batch fit (cosine-decayed to 0).
        default_weight_decay: strength used when no hold-out is possible.
        patience: stop the path after this many strengths without improvement; None tries the whole grid.
        tol: L-BFGS stops when the largest gradient entry is below ``tol`` times its value at ``W = 0``.
        path_tol: the same for the hold-out fits of the search (default ``10 * tol``: only their
            held-out argmax matters).
        min_iter: L-BFGS iterations every fit takes, so warm starts always move.
        seed: seed of the hold-out split and of the mini-batch order.
        check_finite: check the features for NaN/inf (a sweep checks once, then passes False).
        return_model: add the fitted :class:`LinearClassifier` under ``"model"``.
        shard: this process's :class:`~selfsup.eval.shard.Shard` of a data-parallel probe; None: one process.
        progress: show the L2-strength search as a bar (the strength being fitted, how many of how many);
            a string names what is probed in the bar (e.g. the encoder).

    Returns:
        ``{"top1", "top5"}`` test accuracies in percent (top-5 is top-``min(5, C)``), ``"weight_decay"``
        chosen, ``"C"`` (the equivalent scikit-learn C on all training labels), ``"val_top1"`` (held-out
        top-1 at the chosen strength, None without hold-out), ``"val_curve"`` (``[{"weight_decay",
        "val_top1", "val_loss", "iterations", "converged"}]``), ``"fit"`` (the final fit's ``solver``,
        ``iterations``, ``evaluations``, ``converged``), ``"settings"`` (grid, tolerances, ...),
        ``"n_train"``, ``"n_val"``, ``"n_test"``, ``"num_classes"``, ``"feature_dtype"``, ``"device"``,
        ``"world_size"`` (processes that shared the rows), ``"seconds"``.

    Raises:
        ConfigError: see :func:`check_split`; also an empty or non-positive grid, a bad ``val_fraction``,
            or ``batch_size`` with a shard of several ranks.

    Example:
        >>> res = linear_probe(train_feats, train_labels, test_feats, test_labels)  # doctest: +SKIP
        >>> res["top1"], res["weight_decay"]  # doctest: +SKIP
    """
    start = time.perf_counter()
    grid = sorted(
        (float(w) for w in (DEFAULT_WEIGHT_DECAYS if weight_decays is None else weight_decays)), reverse=True
    )
    if not grid or any(not (w > 0 and math.isfinite(w)) for w in grid):
        raise ConfigError(
            f"weight_decays must be a non-empty list of positive numbers, got {weight_decays!r}"
        )
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
    if patience is not None and patience < 1:
        raise ConfigError(f"patience must be >= 1 or None, got {patience!r}")
    if not (tol > 0 and (path_tol is None or path_tol > 0)):
        raise ConfigError(f"tol and path_tol must be positive, got {tol!r} and {path_tol!r}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 or None, got {batch_size!r}")
    shard = Shard() if shard is None else shard
    if batch_size is not None and shard.world > 1:
        raise ConfigError(f"the mini-batch probe (batch_size={batch_size!r}) runs in one process; the "
                          f"data-parallel probe (world size {shard.world}) is full-batch L-BFGS")
    path_tol = 10 * tol if path_tol is None else path_tol
    split = check_split(train_x, train_y, test_x, test_y, train_rows=train_rows,
                        check_finite=check_finite and shard.world == 1)  # several ranks: each checks its rows
    dev = resolve_device(device, split.train_x, split.test_x)
    n = split.train_y.shape[0]
    c = split.num_classes
    lo, hi = shard.bounds(n)  # this rank's block of the used rows (all of them in one process)
    if split.rows is None:
        train_x, rows = split.train_x[lo:hi], None  # a view: a memory map is read only where used
    else:
        train_x, rows = split.train_x, split.rows[lo:hi]
    t_lo, t_hi = shard.bounds(split.test_x.shape[0])
    test_x, test_y = split.test_x[t_lo:t_hi], split.test_y[t_lo:t_hi]
    if check_finite and shard.world > 1:
        _check_finite_rows(shard, dev, ("train_x", train_x, rows), ("test_x", test_x, None))
    stats = _mean_std(train_x, dev, rows, shard)
    data = _prepare_rows(train_x, split.train_y[lo:hi], rows, stats, dev, c, resident_bytes, shard)
    parts = (
        stratified_holdout(split.train_y, val_fraction, seed)  # all labels: the same split on every rank
        if (len(grid) > 1 and val_fraction > 0)
        else None
    )
    opts = dict(max_iter=max_iter, min_iter=min_iter, batch_size=batch_size, epochs=epochs, lr=lr, seed=seed)

    curve: list[dict[str, Any]] = []
    init = None
    n_val = 0
    if parts is None:
        chosen = grid[0] if len(grid) == 1 else float(default_weight_decay)
        val_top1 = None
    else:
        fit_part, val_part = (data.subset(p[(p >= lo) & (p < hi)] - lo) for p in parts)  # this rank's rows
        n_val = val_part.total
        scale = gradient_scale(fit_part, c) if batch_size is None else None
        best, since_best = None, 0
        label = f"probe {progress} L2 search" if isinstance(progress, str) else "probe L2 search"
        with make_progress(enabled=bool(progress) and (shard is None or shard.rank == 0)) as bar:  # rank 0 only
            task = bar.add_task(label, total=len(grid))
            for wd in grid:
                bar.update(task, description=f"{label}: weight_decay {wd:g} (C={1 / (wd * fit_part.total):.3g})")
                w, b, info = _fit(fit_part, c, wd, init, tol=path_tol, scale=scale, **opts)
                init = (w, b)
                (acc,), loss = _score(val_part, w, b, (1,))
                curve.append({"weight_decay": wd, "val_top1": acc, "val_loss": loss,
                              "iterations": info.iterations, "evaluations": info.evaluations,
                              "converged": info.converged})
                bar.advance(task)
                if best is None or (acc, -loss) > (best[1], -best[2]):
                    best, since_best = (wd, acc, loss, init), 0
                else:
                    since_best += 1
                    if patience is not None and since_best >= patience:
                        break
            stopped = f", stopped at {len(curve)} of {len(grid)}" if len(curve) < len(grid) else ""
            # an early stop fills the bar (it stayed at 4/7, as if cut off)
            bar.update(task, total=len(curve), completed=len(curve),
                       description=f"{label}: chose weight_decay {best[0]:g} (val top-1 {best[1]:.1f}%{stopped})")
        chosen, val_top1, _, init = best
        del fit_part, val_part  # free the hold-out copies (resident sets) before the refit
    w, b, info = _fit(data, c, chosen, init, tol=tol, scale=None, **opts)
    test = _Rows(test_x, test_y.to(dev), None, stats, dev, data.chunk, shard)
    (top1, top5), _ = _score(test, w, b, (1, 5))
    out: dict[str, Any] = {
        "top1": top1,
        "top5": top5,
        "weight_decay": chosen,
        "C": 1.0 / (chosen * n),
        "val_top1": val_top1,
        "val_curve": curve,
        "fit": info.as_dict(),
        "settings": {"weight_decays": grid, "val_fraction": val_fraction, "patience": patience, "tol": tol,
                     "path_tol": path_tol, "tol_rule": "max|grad| <= tol * max|grad at W=0|",
                     "min_iter": min_iter, "max_iter": max_iter, "batch_size": batch_size,
                     "epochs": epochs if batch_size else None, "lr": lr if batch_size else None, "seed": seed},
        "n_train": n,
        "n_val": n_val,
        "n_test": int(split.test_x.shape[0]),
        "num_classes": c,
        "feature_dtype": str(split.train_x.dtype).replace("torch.", ""),
        "device": str(dev),
        "world_size": shard.world,
        "seconds": time.perf_counter() - start,
    }
    if return_model:
        out["model"] = LinearClassifier(stats[0], stats[1], w, b, split.classes.to(dev))
    return out
