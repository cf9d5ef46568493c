"""Linear probe on cached features: multinomial logistic regression, L2 strength chosen on held-out labels.

The protocol is the one of Kolesnikov et al. (revisiting self-supervised learning) and CPC v2: features
of a frozen encoder are standardised with the training set's mean and standard deviation, a
multinomial logistic regression is fitted for each L2 strength of a small grid on a stratified part of
the training labels and scored on the rest, and the best strength is refitted on all training labels.

The objective is exactly scikit-learn's ``LogisticRegression(C=C)`` (multinomial, unpenalised bias)::

    mean_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||_F^2,     C = 1 / (weight_decay * N)

so a probe here and scikit-learn at that ``C`` have the same minimiser. It is solved by full-batch
L-BFGS (strong-Wolfe line search) in torch when the features fit in memory, warm-started along the
grid from the strongest penalty to the weakest, and by mini-batch Adam on the same objective when they
do not; on the GPU when the features live there or ``device="cuda"``.

- [0] Revisiting Self-Supervised Visual Representation Learning, 2019, https://arxiv.org/abs/1901.09005
- [1] CPC v2, 2019, https://arxiv.org/abs/1905.09272
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.errors import ConfigError

ArrayLike = Union[torch.Tensor, np.ndarray]

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = tuple(10.0**e for e in range(-6, 1))
"""L2 strengths tried by default (1e-6 ... 1), on standardised features and the mean cross-entropy."""

DEFAULT_WEIGHT_DECAY = 1e-3
"""L2 strength used when no hold-out is possible (a class with fewer than 2 training labels)."""

FULL_BATCH_BYTES = 4 * 2**30
"""Training features up to this size (float32) are fitted full-batch with L-BFGS, larger ones mini-batch."""

_EVAL_CHUNK = 65536


@dataclass
class Split:
    """Validated features and labels of a train/test split, labels mapped to ``0 .. C-1``.

    Attributes:
        train_x: (N, D) float32 training features.
        train_y: (N,) int64 training class indices.
        test_x: (M, D) float32 test features.
        test_y: (M,) int64 test class indices (None when no test labels were given).
        classes: (C,) int64 original label of each class index, sorted.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    classes: torch.Tensor

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


def as_features(x: ArrayLike, name: str) -> torch.Tensor:
    """Features as a float32 2-D tensor with only finite values; raise ConfigError otherwise."""
    x = as_tensor(x, name)
    if x.ndim != 2:
        raise ConfigError(f"{name} must be 2-D (samples, features), got shape {tuple(x.shape)}")
    if not (
        x.dtype.is_floating_point
        or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    ):
        raise ConfigError(f"{name} must be numeric, got dtype {x.dtype}")
    x = x.float()
    rows = max(1, 2**24 // max(1, x.shape[1]))
    if x.numel() and not all(bool(torch.isfinite(c).all()) for c in x.split(rows)):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ConfigError(f"{name} has NaN or inf values in {bad} of {x.shape[0]} rows")
    return x


def check_split(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike | None,
    num_classes: int | None = None,
) -> Split:
    """Validate a train/test split of features and labels; map labels to class indices.

    Args:
        train_x: (N, D) training features.
        train_y: (N,) integer training labels.
        test_x: (M, D) test features.
        test_y: (M,) integer test labels, or None when only the test features are needed.
        num_classes: when given, labels must lie in ``[0, num_classes)`` and the classes are
            ``0 .. num_classes-1`` (some may have no training sample); otherwise the classes are the
            distinct training labels.

    Returns:
        The validated :class:`Split`.

    Raises:
        ConfigError: count mismatch, differing feature dims, NaN/inf features, fewer than 2 classes, or a
            test label that no training sample has.
    """
    tx, ty = as_features(train_x, "train_x"), as_labels(train_y, "train_y")
    vx = as_features(test_x, "test_x")
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
    return Split(tx, train_idx, vx, test_idx, classes)


def resolve_device(device: str | torch.device | None, *tensors: torch.Tensor) -> torch.device:
    """``device`` when given, else the CUDA device of the first tensor on one, else the CPU."""
    if device is not None:
        return torch.device(device)
    for t in tensors:
        if t.is_cuda:
            return t.device
    return torch.device("cpu")


def topk_accuracy(scores: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent; ``k`` is capped at the number of classes (top-5 of 3 classes is 100).

    Ties are ranked by the smaller class index (stable sort), so the result is deterministic.

    Shape:
        scores: (M, C); target: (M,) class indices.
    """
    kmax = min(max(ks), scores.shape[1])
    ranked = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :kmax]  # (M, kmax)
    hits = ranked == target.to(ranked.device)[:, None]
    return [100.0 * int(hits[:, : min(k, kmax)].any(dim=1).sum()) / hits.shape[0] for k in ks]


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
        out = [
            torch.addmm(
                self.bias, _standardise(chunk.to(self.weight.device), self.mean, self.std), self.weight
            )
            for chunk in x.split(_EVAL_CHUNK)
        ]
        return torch.cat(out)

    def predict(self, x: ArrayLike) -> torch.Tensor:
        """Predicted original labels (M,) of raw features (M, D)."""
        return self.classes[self.logits(x).argmax(dim=1).to(self.classes.device)]


def _standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def _mean_std(x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (population), accumulated in float64 over row chunks."""
    n = x.shape[0]
    rows = max(1, 2**22 // max(1, x.shape[1]))  # float64 chunks of 32 MB, whatever the feature size
    s = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    for chunk in x.split(rows):
        s += chunk.to(device, torch.float64).sum(0)
    mean = s / n
    ss = torch.zeros_like(s)
    for chunk in x.split(rows):
        ss += (chunk.to(device, torch.float64) - mean).square().sum(0)
    std = (ss / n).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean.float(), std.float()


def _objective(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, weight_decay: float
) -> torch.Tensor:
    """Mean cross-entropy plus ``weight_decay / 2 * ||W||^2`` (scikit-learn's objective divided by C*N)."""
    return F.cross_entropy(torch.addmm(b, x, w), y) + 0.5 * weight_decay * w.square().sum()


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
    full_batch_bytes: int = FULL_BATCH_BYTES,
    epochs: int = 30,
    lr: float = 3e-2,
    tol: float = 1e-4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit multinomial logistic regression ``softmax(x W + b)`` with an L2 penalty on ``W`` (not ``b``).

    Minimises ``mean_i CE(x_i W + b, y_i) + weight_decay / 2 * ||W||_F^2``, the minimiser of
    scikit-learn's ``LogisticRegression(C=1 / (weight_decay * N))``. ``x`` is used as given (no
    standardisation; :func:`linear_probe` does that).

    Args:
        x: (N, D) features.
        y: (N,) class indices in ``[0, num_classes)``.
        weight_decay: L2 strength (> 0; use a tiny value for an almost unpenalised fit).
        num_classes: number of outputs; ``max(y) + 1`` when None.
        max_iter: L-BFGS iterations (full batch).
        init: warm start ``(W, b)``.
        device: where to fit; the device of ``x`` when None.
        batch_size: when given, or when ``x`` is larger than ``full_batch_bytes``, fit by mini-batch Adam
            (``epochs`` passes, cosine-decayed ``lr``) instead of full-batch L-BFGS.
        full_batch_bytes: largest float32 ``x`` fitted full-batch.
        epochs: passes of the mini-batch fit.
        lr: peak learning rate of the mini-batch fit.
        tol: L-BFGS stops when the largest gradient entry is below this (scikit-learn's ``tol``).
        seed: seed of the mini-batch order.

    Returns:
        ``(W, b)``: (D, C) weights and (C,) biases, on ``device``.

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
    n, d = x.shape
    w = torch.zeros(d, num_classes, device=dev)
    b = torch.zeros(num_classes, device=dev)
    if init is not None:
        w.copy_(init[0])
        b.copy_(init[1])
    w.requires_grad_(True)
    b.requires_grad_(True)
    if batch_size is None and n * d * 4 <= full_batch_bytes:
        _fit_lbfgs(x.to(dev), y.to(dev), w, b, weight_decay, max_iter, tol)
    else:
        _fit_minibatch(x, y, None, w, b, weight_decay, batch_size or 4096, epochs, lr, seed, None)
    return w.detach(), b.detach()


@torch.no_grad()
def _loss_and_grad(
    x: torch.Tensor, onehot: torch.Tensor, w: torch.Tensor, b: torch.Tensor, weight_decay: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_objective` and its gradient, by hand: a third fewer passes than autograd.

    The gradient of the mean cross-entropy is ``x^T (softmax - onehot) / N``; computing it as
    ``(P^T x)^T`` reads ``x`` row-major, which BLAS does about twice as fast as ``x^T P``.

    Shape:
        x: (N, D); onehot: (N, C); w: (D, C); b: (C,).
    """
    n = x.shape[0]
    logits = torch.addmm(b, x, w)  # (N, C)
    m = logits.amax(dim=1, keepdim=True)  # (N, 1)
    target_logit = torch.vdot(logits.flatten(), onehot.flatten())
    e = logits.sub_(m).exp_()  # (N, C), in place
    s = e.sum(dim=1, keepdim=True)  # (N, 1)
    loss = (s.log().sum() + m.sum() - target_logit) / n + 0.5 * weight_decay * w.square().sum()
    g = e.div_(s).sub_(onehot)  # (N, C): softmax - onehot
    grad_w = torch.mm(g.t(), x).t().contiguous().div_(n).add_(w, alpha=weight_decay)  # (C,N)@(N,D) -> (D,C)
    grad_b = g.sum(dim=0).div_(n)
    return loss, grad_w, grad_b


def _fit_lbfgs(
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    weight_decay: float,
    max_iter: int,
    tol: float,
) -> None:
    """Full-batch L-BFGS (strong-Wolfe line search); stops at ``max|grad| <= tol`` as scikit-learn does."""
    onehot = F.one_hot(y, w.shape[1]).to(x.dtype)  # (N, C)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=int(max_iter * 1.25),
        history_size=20,
        tolerance_grad=tol,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        loss, w.grad, b.grad = _loss_and_grad(x, onehot, w, b, weight_decay)
        return loss

    opt.step(closure)


def _fit_minibatch(
    x: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor | None,
    w: torch.Tensor,
    b: torch.Tensor,
    weight_decay: float,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    stats: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Adam on the same objective (the L2 term is in the loss, not decoupled) over shuffled batches.

    Only the rows ``rows`` of ``x`` are used (all when None). ``x`` may stay on the CPU (even
    memory-mapped): each batch is gathered, moved to ``w``'s device and, when ``stats`` is given,
    standardised there.
    """
    rows = torch.arange(x.shape[0]) if rows is None else rows.cpu()
    n = rows.numel()
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.Adam([w, b], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = rows[torch.randperm(n, generator=gen)]
        for idx in order.split(batch_size):
            xb = x[idx.to(x.device)].to(w.device, non_blocking=True)
            if stats is not None:
                xb = _standardise(xb, *stats)
            loss = _objective(xb, y[idx.to(y.device)].to(w.device), w, b, weight_decay)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            sched.step()


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


@torch.no_grad()
def _eval_logits(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stats: tuple | None = None
) -> torch.Tensor:
    out = []
    for chunk in x.split(_EVAL_CHUNK):
        chunk = chunk.to(w.device)
        if stats is not None:
            chunk = _standardise(chunk, *stats)
        out.append(torch.addmm(b, chunk, w))
    return torch.cat(out)


def linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    *,
    weight_decays: tuple[float, ...] | list[float] | None = None,
    val_fraction: float = 0.2,
    max_iter: int = 500,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    full_batch_bytes: int = FULL_BATCH_BYTES,
    epochs: int = 30,
    lr: float = 3e-2,
    default_weight_decay: float = DEFAULT_WEIGHT_DECAY,
    patience: int | None = 2,
    tol: float = 1e-4,
    seed: int = 0,
    return_model: bool = False,
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

    Protocol of [0] and [1]; the objective equals scikit-learn's ``LogisticRegression(C=1/(wd*N))``.

    - [0] Revisiting Self-Supervised Visual Representation Learning, 2019, https://arxiv.org/abs/1901.09005
    - [1] CPC v2, 2019, https://arxiv.org/abs/1905.09272

    Args:
        train_x: (N, D) training features (torch or numpy; CUDA tensors are probed on their GPU).
        train_y: (N,) integer training labels.
        test_x: (M, D) test features.
        test_y: (M,) integer test labels; every one must occur in ``train_y``.
        weight_decays: L2 grid; :data:`DEFAULT_WEIGHT_DECAYS` (1e-6 ... 1) when None.
        val_fraction: fraction of each class held out to choose the strength.
        max_iter: L-BFGS iterations per fit.
        device: where to fit; the features' device when None.
        batch_size: mini-batch fit with this batch size (Adam, ``epochs`` passes) instead of L-BFGS; also
            used (default 4096) when the training features exceed ``full_batch_bytes``.
        full_batch_bytes: largest float32 training matrix fitted full-batch.
        epochs: passes of the mini-batch fit.
        lr: peak learning rate of the mini-batch fit (cosine-decayed to 0).
        default_weight_decay: strength used when no hold-out is possible.
        patience: stop the path after this many strengths without improvement; None tries the whole grid.
        tol: L-BFGS stops when the largest gradient entry is below this (scikit-learn's ``tol``).
        seed: seed of the hold-out split and of the mini-batch order.
        return_model: add the fitted :class:`LinearClassifier` under ``"model"``.

    Returns:
        ``{"top1", "top5"}`` test accuracies in percent (top-5 is top-``min(5, C)``), ``"weight_decay"``
        chosen, ``"C"`` (the equivalent scikit-learn C on all training labels), ``"val_top1"`` (held-out
        top-1 at the chosen strength, None without hold-out), ``"val_curve"`` (``[{"weight_decay",
        "val_top1", "val_loss"}]``), ``"n_train"``, ``"n_test"``, ``"num_classes"``, ``"seconds"``.

    Raises:
        ConfigError: see :func:`check_split`; also an empty or non-positive grid or a bad ``val_fraction``.

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
    split = check_split(train_x, train_y, test_x, test_y)
    dev = resolve_device(device, split.train_x, split.test_x)
    n, d = split.train_x.shape
    c = split.num_classes
    full_batch = batch_size is None and n * d * 4 <= full_batch_bytes
    stats = _mean_std(split.train_x, dev)
    parts = (
        stratified_holdout(split.train_y, val_fraction, seed)
        if (len(grid) > 1 and val_fraction > 0)
        else None
    )
    if full_batch:
        # One standardised copy, its rows ordered hold-out-fit part first, so that the fit part, the
        # held-out part and the whole set are all views of it (the objective ignores row order).
        order = None if parts is None else torch.cat(parts)
        xs = split.train_x.to(dev) if order is None else split.train_x[order.to(split.train_x.device)].to(dev)
        if xs.data_ptr() == split.train_x.data_ptr():
            xs = xs.clone()
        xs.sub_(stats[0]).div_(stats[1])
        ys = (split.train_y if order is None else split.train_y[order.to(split.train_y.device)]).to(dev)
    else:
        xs, ys = split.train_x, split.train_y

    fit_data: tuple[torch.Tensor, torch.Tensor] | None = None  # the hold-out fit part, gathered once

    def fit(
        rows: torch.Tensor | None, wd: float, init: tuple | None, fit_tol: float
    ) -> tuple[torch.Tensor, ...]:
        w = torch.zeros(d, c, device=dev) if init is None else init[0].clone()
        b = torch.zeros(c, device=dev) if init is None else init[1].clone()
        w.requires_grad_(True)
        b.requires_grad_(True)
        if full_batch:
            x_fit, y_fit = (xs, ys) if rows is None else fit_data
            _fit_lbfgs(x_fit, y_fit, w, b, wd, max_iter, fit_tol)
        else:
            _fit_minibatch(xs, ys, rows, w, b, wd, batch_size or 4096, epochs, lr, seed, stats)
        return w.detach(), b.detach()

    curve: list[dict[str, float]] = []
    init = None
    if parts is None:
        chosen = grid[0] if len(grid) == 1 else float(default_weight_decay)
        val_top1 = None
    else:
        fit_idx, val_idx = parts
        if full_batch:  # views of the reordered copy
            n_fit = len(fit_idx)
            fit_data, val_x, val_y = (xs[:n_fit], ys[:n_fit]), xs[n_fit:], ys[n_fit:]
        else:
            val_x, val_y = xs[val_idx.to(xs.device)], ys[val_idx.to(ys.device)].to(dev)
        best, since_best = None, 0
        for wd in grid:
            # Only the held-out argmax matters here, so the path is solved 10x looser than the refit.
            init = fit(fit_idx, wd, init, 10 * tol)
            logits = _eval_logits(val_x, *init, stats=None if full_batch else stats)
            acc = topk_accuracy(logits, val_y, (1,))[0]
            loss = float(F.cross_entropy(logits, val_y))
            curve.append({"weight_decay": wd, "val_top1": acc, "val_loss": loss})
            if best is None or (acc, -loss) > (best[1], -best[2]):
                best, since_best = (wd, acc, loss, init), 0
            else:
                since_best += 1
                if patience is not None and since_best >= patience:
                    break
        chosen, val_top1, _, init = best
        fit_data = val_x = None  # free the gathered copies before the refit
    w, b = fit(None, chosen, init, tol)
    logits = _eval_logits(split.test_x, w, b, stats)
    top1, top5 = topk_accuracy(logits, split.test_y.to(dev))
    out: dict[str, Any] = {
        "top1": top1,
        "top5": top5,
        "weight_decay": chosen,
        "C": 1.0 / (chosen * n),
        "val_top1": val_top1,
        "val_curve": curve,
        "n_train": n,
        "n_test": int(split.test_x.shape[0]),
        "num_classes": c,
        "seconds": time.perf_counter() - start,
    }
    if return_model:
        out["model"] = LinearClassifier(stats[0], stats[1], w, b, split.classes.to(dev))
    return out
