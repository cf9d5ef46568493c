"""Linear probe on cached features: multinomial logistic regression, L2 strength chosen on held-out labels.

The protocol is the one of Kolesnikov et al. (revisiting self-supervised learning) and CPC v2: features
of a frozen encoder are standardised with the training set's mean and standard deviation, a
multinomial logistic regression is fitted for each L2 strength of a small grid on a stratified part of
the training labels and scored on the rest, and the best strength is refitted on all training labels.

The objective is exactly scikit-learn's ``LogisticRegression(C=C)`` (multinomial, unpenalised bias)::

    mean_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||_F^2,     C = 1 / (weight_decay * N)

so a probe here and scikit-learn at that ``C`` have the same minimiser. It is solved by full-batch
L-BFGS (weak Wolfe line search) in torch, warm-started along the grid from the strongest penalty to the
weakest with its curvature pairs carried along (corrected exactly for the change of penalty), or by
mini-batch Adam on the same objective when a ``batch_size`` is given; on the GPU when the
features live there or ``device="cuda"``.

Scale: the objective and its gradient are accumulated over row chunks (float64 sums across chunks), so
no (N, C) logit or one-hot array and no second copy of the training features is ever made: features are
read in their stored dtype (a float16 cache stays float16) from wherever they live (a memory map
included), standardised and converted chunk by chunk into one reused cache-sized buffer. A training set
small enough (twice its float32 size within ``resident_bytes``: 256 MiB on the CPU, 60% of the free
memory on a GPU) is copied once, standardised, to the fitting device.

Stopping: a fit is done when a tighter fit would no longer change its predictions. By default
(``stop="objective"``) a fit stops once one L-BFGS iteration lowered the objective by at most ``tol``
(final fit: 1e-4; hold-out fits of the search: ``path_tol`` = 1e-3) of its value, a relative rule and so
scale-free in the number of classes (an absolute gradient threshold under-fitted at 1,000 classes); the
search stops at the first strength whose held-out top-1 falls (``patience=1``). Measured against
scikit-learn (``benchmarks/probe_stopping.py``, table in ``benchmarks/README.md``) it costs 4-5x fewer
evaluations than the gradient rule before, at the same top-1. ``stop="predictions"`` (an iteration
changed the predicted class of at most ``tol`` of the held-out rows) was cheaper still but under-fitted
the hold-out fits enough to pick another strength (1.1 points of top-1 at 10 classes);
``stop="gradient"`` keeps the rule before (``max|grad| <= tol * max|grad at W=0|``).

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


STOP_RULES: tuple[str, ...] = ("objective", "predictions", "gradient")
"""Stopping rules of the full-batch fits (see :func:`linear_probe`'s ``stop``)."""

DEFAULT_TOLS: dict[str, tuple[float, float]] = {"predictions": (1e-2, 1e-2), "objective": (1e-4, 1e-3),
                                                "gradient": (1e-4, 1e-3)}
"""``(tol, path_tol)`` of each stopping rule when not given: the final fit's and the hold-out fits'."""

TOL_RULES: dict[str, str] = {
    "predictions": "stop when one L-BFGS iteration changes the arg-max class of <= tol of the held-out rows",
    "objective": "stop when one iteration lowers the objective by <= tol of its value",
    "gradient": "stop when max|grad| <= tol * max|grad at W=0|",
}


@dataclass
class FitInfo:
    """How a fit ended: solver, iterations (L-BFGS iterations or Adam steps), evaluations, convergence.

    ``evaluations`` counts loss-and-gradient evaluations over the fit's rows; ``checks`` counts the
    prediction passes (forward only) over the monitored rows of the ``"predictions"`` rule."""

    solver: str
    iterations: int
    evaluations: int
    converged: bool | None  # None for the mini-batch solver (no stopping rule: a fixed number of epochs)
    tol_abs: float | None = None
    checks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"solver": self.solver, "iterations": self.iterations, "evaluations": self.evaluations,
                "checks": self.checks, "converged": self.converged}


class _History:
    """L-BFGS correction pairs ``(s, y)`` (Nocedal 1980), kept along an L2 path, in compact form.

    The pairs of one strength serve the next: the L2 term is quadratic, so moving from strength ``a`` to
    ``b`` changes every gradient difference by exactly ``(b - a) * s`` on the weights (not the biases),
    and :meth:`rebase` applies that correction. A warm-started fit then starts with the curvature the
    previous fit learnt instead of a steepest-descent step. The pairs are the rows of two matrices and
    the direction uses the compact representation of Byrd, Nocedal & Schnabel (1994): a handful of
    matrix-vector products per iteration instead of the two-loop recursion's 4 per pair (on a busy CPU
    each parallel vector operation costs a thread wake-up).
    """

    def __init__(self, split: int, size: int = LBFGS_HISTORY):
        self.split = split  # entries of W in the flat parameter vector (the penalised part)
        self.size = size
        self.s: torch.Tensor | None = None  # (m, n) oldest first
        self.y: torch.Tensor | None = None
        self.weight_decay: float | None = None

    @property
    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """``(s, y, 1 / y's)`` of each kept pair, oldest first."""
        if self.s is None:
            return []
        return [(s, y, 1.0 / float(y.dot(s))) for s, y in zip(self.s, self.y, strict=True)]

    def clear(self) -> None:
        self.s = self.y = None

    def rebase(self, weight_decay: float) -> None:
        if self.s is not None and self.weight_decay is not None and weight_decay != self.weight_decay:
            self.y[:, : self.split].add_(self.s[:, : self.split], alpha=weight_decay - self.weight_decay)
            keep = (self.y * self.s).sum(dim=1) > 0  # convex: always, unless rounding ate the curvature
            self.s, self.y = (self.s[keep], self.y[keep]) if bool(keep.any()) else (None, None)
        self.weight_decay = weight_decay

    def push(self, s: torch.Tensor, y: torch.Tensor) -> None:
        ys, yy = float(y.dot(s)), float(y.dot(y))
        if ys > 1e-10 * yy:  # curvature along s (always, when convex, up to rounding)
            if self.s is None:
                self.s, self.y = s[None], y[None]
            else:
                self.s = torch.cat([self.s[-(self.size - 1):], s[None]]) if self.size > 1 else s[None]
                self.y = torch.cat([self.y[-(self.size - 1):], y[None]]) if self.size > 1 else y[None]

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """``-H g``, ``H`` the L-BFGS inverse Hessian with ``H_0 = gamma I``, ``gamma = s'y / y'y`` of the
        newest pair (compact form: ``H = gamma I + [S, gamma Y] M [S, gamma Y]'``)."""
        if self.s is None:
            return g.neg()
        sg, yg = (self.s @ g).double(), (self.y @ g).double()  # (m,)
        sy, yy = (self.s @ self.y.t()).double(), (self.y @ self.y.t()).double()  # (m, m)
        gamma = float(sy[-1, -1] / yy[-1, -1])
        r = torch.triu(sy)  # R_ij = s_i'y_j, i <= j
        r1 = torch.linalg.solve_triangular(r, sg[:, None], upper=True)  # R^-1 S'g
        inner = (torch.diag(torch.diagonal(sy)) + gamma * yy) @ r1 - gamma * yg[:, None]
        q1 = torch.linalg.solve_triangular(r.t(), inner, upper=False)[:, 0]  # R^-T (...)
        q2 = -gamma * r1[:, 0]
        hg = torch.addmv(g * gamma, self.s.t(), q1.float())
        hg = torch.addmv(hg, self.y.t(), q2.float())
        return hg.neg_()


def _line_search(evaluate, theta: torch.Tensor, f: float, g: torch.Tensor, d: torch.Tensor, t: float,
                 max_evals: int = 10, c1: float = 1e-4, c2: float = 0.9):
    """A step ``t`` along ``d`` meeting the weak Wolfe conditions (bisection with quadratic backtracking).

    Returns ``(theta + t d, f, g)`` there, or the best sufficient-decrease point met when the budget
    runs out, or None when no step decreased the objective enough.
    """
    gtd = float(g.dot(d))
    lo, hi, best = 0.0, math.inf, None
    for _ in range(max_evals):
        theta_t = torch.add(theta, d, alpha=t)
        f_t, g_t = evaluate(theta_t)
        if not math.isfinite(f_t) or f_t > f + c1 * t * gtd:  # too long
            hi = t
            if lo == 0.0 and math.isfinite(f_t):  # minimum of the quadratic through f, f'(0) and f(t)
                t_q = -gtd * t * t / (2.0 * (f_t - f - gtd * t))
                t = min(max(t_q, 0.1 * t), 0.5 * t)
            else:
                t = 0.5 * (lo + hi)
        elif (gtd_t := float(g_t.dot(d))) < c2 * gtd:  # still descending steeply: too short
            lo, best = t, (theta_t, f_t, g_t)
            if hi == math.inf:  # where the slope, linear in t, would vanish, within 2x..10x the step
                t = t * min(max(gtd / (gtd - gtd_t), 2.0), 10.0)
            else:
                t = 0.5 * (lo + hi)
        else:
            return theta_t, f_t, g_t
    return best


@torch.no_grad()
def _predict(data: _Rows, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Arg-max class (n,) of each of this rank's rows of ``data``, chunk by chunk."""
    return torch.cat([torch.addmm(b, xb, w).argmax(dim=1) for xb, _ in data.blocks()])


@torch.no_grad()
def _fit_lbfgs(
    data: _Rows,
    w: torch.Tensor,
    b: torch.Tensor,
    weight_decay: float,
    max_iter: int,
    tol: float,
    min_iter: int,
    scale: float | None,
    *,
    stop: str = "gradient",
    history: _History | None = None,
    monitor: _Rows | None = None,
) -> FitInfo:
    """Full-batch L-BFGS (weak Wolfe line search) from ``(w, b)``, updated in place, until ``stop`` says done.

    ``stop``: ``"gradient"``: ``max|grad| <= tol * scale`` (``scale`` is :func:`gradient_scale` of the data:
    the gradient at zero, independent of the start, so a warm start is judged by the cold-start
    yardstick); ``"objective"``: the last iteration lowered the objective by at most ``tol`` times its
    value; ``"predictions"``: the last iteration changed the arg-max class of at most ``tol`` times the
    rows of ``monitor`` (the rows themselves when None). Every rule is tested only after ``min_iter``
    iterations; a fit whose objective no longer decreases beyond float32 rounding (1e-9 of its value in
    an iteration) also stops, converged as far as the precision allows. ``history`` carries the L-BFGS pairs from the previous strength of a path (rebased to
    this one) and receives this fit's.
    """
    d_, c_ = w.shape
    split = d_ * c_
    history = _History(split) if history is None else history
    history.rebase(weight_decay)
    evals = checks = 0

    def evaluate(theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        nonlocal evals
        evals += 1
        loss, gw, gb = _loss_and_grad(data, theta[:split].view(d_, c_), theta[split:], weight_decay)
        return float(loss), torch.cat([gw.view(-1), gb])

    def changed(theta: torch.Tensor, before: torch.Tensor | None) -> tuple[int, torch.Tensor]:
        nonlocal checks
        checks += 1
        now = _predict(monitor, theta[:split].view(d_, c_), theta[split:])
        moved = 0 if before is None else int((now != before).sum())
        if monitor.shard.world > 1:
            moved = round(float(monitor.shard.sum_(torch.tensor([moved], dtype=torch.float64, device=now.device))))
        return moved, now

    if stop == "predictions":
        monitor = data if monitor is None else monitor
    tol_abs = tol * scale if stop == "gradient" else None
    theta = torch.cat([w.reshape(-1), b]).float()
    f, g = evaluate(theta)
    preds = changed(theta, None)[1] if stop == "predictions" else None
    iters, converged = 0, False
    while iters < max_iter:
        d = history.direction(g)
        if float(d.dot(g)) >= 0:  # not a descent direction (cannot happen with positive pairs): restart
            history.clear()
            d = g.neg()
        t = 1.0 if history.s is not None else min(1.0, 1.0 / max(float(g.norm()), 1e-30))  # scipy's first step
        step = _line_search(evaluate, theta, f, g, d, t)
        if step is None:  # no decrease left at float32 precision: as good as this start gets
            converged = iters >= min_iter
            break
        theta_new, f_new, g_new = step
        history.push(theta_new - theta, g_new - g)
        theta, f_prev, f, g = theta_new, f, f_new, g_new
        iters += 1
        if f_prev - f <= 1e-9 * abs(f) and iters >= min_iter:  # no decrease left at float32 precision
            converged = True
            break
        if stop == "predictions":
            moved, preds = changed(theta, preds)
            done = moved <= tol * monitor.total
        elif stop == "objective":
            done = f_prev - f <= tol * abs(f)
        else:
            done = float(g.abs().max()) <= tol_abs
        if done and iters >= min_iter:
            converged = True
            break
    w.copy_(theta[:split].view(d_, c_))
    b.copy_(theta[split:])
    return FitInfo("lbfgs", iters, evals, converged, tol_abs, checks)


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
    stop: str = "gradient",
    history: _History | None = None,
    monitor: _Rows | None = None,
) -> tuple[torch.Tensor, torch.Tensor, FitInfo]:
    d = data.x.shape[1]
    w = torch.zeros(d, num_classes, device=data.device)
    b = torch.zeros(num_classes, device=data.device)
    if init is not None:
        w.copy_(init[0])
        b.copy_(init[1])
    if batch_size is None:
        if stop == "gradient" and scale is None:
            scale = gradient_scale(data, num_classes)
        info = _fit_lbfgs(data, w, b, weight_decay, max_iter, tol, min_iter, scale, stop=stop, history=history,
                          monitor=monitor)
    else:
        w.requires_grad_(True)
        b.requires_grad_(True)
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
    patience: int | None = 1,
    stop: str = "objective",
    tol: float | None = None,
    path_tol: float | None = None,
    min_iter: int = 1,
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
        patience: stop the path after this many strengths without improvement (1: as soon as held-out
            top-1 falls); None tries the whole grid.
        stop: when an L-BFGS fit is done (:data:`STOP_RULES`). ``"objective"`` (default): once one
            iteration lowers the objective by at most ``tol`` times its value. ``"predictions"``: once one
            iteration changes the predicted class of at most ``tol`` (a fraction) of the held-out rows
            (the final fit watches the same rows, which it fits too, or all training rows when there is
            no hold-out). ``"gradient"``: once the largest gradient entry is below ``tol`` times its value
            at ``W = 0`` (the rule before; it costs one more evaluation per data set, the scale).
        tol: the final fit's tolerance of the ``stop`` rule; None: :data:`DEFAULT_TOLS` (objective 1e-4;
            predictions 0.01, i.e. 1% of the held-out predictions change in an iteration; gradient 1e-4).
        path_tol: the same for the hold-out fits of the search; None: :data:`DEFAULT_TOLS` (objective
            1e-3, predictions 0.01, gradient 1e-3).
        min_iter: L-BFGS iterations every fit takes before its rule is tested.
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
        "val_top1", "val_loss", "iterations", "evaluations", "checks", "converged"}]``), ``"fit"`` (the
        final fit's ``solver``, ``iterations``, ``evaluations``, ``checks``, ``converged``), ``"cost"``
        (``evaluations``: all loss-and-gradient evaluations of the search and the final fit; ``passes``:
        the same in passes over all training rows, prediction checks and held-out scoring included),
        ``"settings"`` (grid, rule, tolerances, ...),
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
    if stop not in STOP_RULES:
        raise ConfigError(f"stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")
    if not ((tol is None or tol > 0) and (path_tol is None or path_tol > 0)):
        raise ConfigError(f"tol and path_tol must be positive, got {tol!r} and {path_tol!r}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 or None, got {batch_size!r}")
    shard = Shard() if shard is None else shard
    if batch_size is not None and shard.world > 1:
        raise ConfigError(f"the mini-batch probe (batch_size={batch_size!r}) runs in one process; the "
                          f"data-parallel probe (world size {shard.world}) is full-batch L-BFGS")
    tol = DEFAULT_TOLS[stop][0] if tol is None else float(tol)
    path_tol = DEFAULT_TOLS[stop][1] if path_tol is None else float(path_tol)
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
    opts = dict(max_iter=max_iter, min_iter=min_iter, batch_size=batch_size, epochs=epochs, lr=lr, seed=seed,
                stop=stop, history=_History(data.x.shape[1] * c))
    evaluations, passes = 0, 0.0  # loss-and-gradient evaluations; the same and prediction checks in passes over n
    monitor = None

    curve: list[dict[str, Any]] = []
    init = None
    n_val = 0
    if parts is None:
        chosen = grid[0] if len(grid) == 1 else float(default_weight_decay)
        val_top1 = None
    else:
        fit_part, val_part = (data.subset(p[(p >= lo) & (p < hi)] - lo) for p in parts)  # this rank's rows
        n_val = val_part.total
        scale = gradient_scale(fit_part, c) if batch_size is None and stop == "gradient" else None
        if scale is not None:
            evaluations, passes = 1, fit_part.total / n
        best, since_best = None, 0
        label = f"probe {progress} L2 search" if isinstance(progress, str) else "probe L2 search"
        with make_progress(enabled=bool(progress) and (shard is None or shard.rank == 0)) as bar:  # rank 0 only
            task = bar.add_task(label, total=len(grid))
            for wd in grid:
                bar.update(task, description=f"{label}: weight_decay {wd:g} (C={1 / (wd * fit_part.total):.3g})")
                w, b, info = _fit(fit_part, c, wd, init, tol=path_tol, scale=scale, monitor=val_part, **opts)
                init = (w, b)
                evaluations += info.evaluations
                passes += (info.evaluations * fit_part.total + info.checks * n_val) / n
                (acc,), loss = _score(val_part, w, b, (1,))
                passes += n_val / n
                curve.append({"weight_decay": wd, "val_top1": acc, "val_loss": loss,
                              "iterations": info.iterations, "evaluations": info.evaluations,
                              "checks": info.checks, "converged": info.converged})
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
        monitor = val_part  # the final fit's predictions are watched on the same rows (now fitted too)
        del fit_part  # free the hold-out copy (resident sets) before the refit
    if stop == "gradient" and batch_size is None:
        evaluations, passes = evaluations + 1, passes + 1.0  # gradient_scale of all rows
    w, b, info = _fit(data, c, chosen, init, tol=tol, scale=None, monitor=monitor, **opts)
    evaluations += info.evaluations
    passes += info.evaluations + info.checks * (n if monitor is None else monitor.total) / n
    del monitor
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
        "cost": {"evaluations": evaluations, "passes": passes},
        "settings": {"weight_decays": grid, "val_fraction": val_fraction, "patience": patience, "stop": stop,
                     "tol": tol, "path_tol": path_tol, "tol_rule": TOL_RULES[stop],
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
