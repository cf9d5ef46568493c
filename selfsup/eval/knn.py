"""k-nearest-neighbour classification of cached features by cosine similarity.

Features are L2-normalised, so the inner product is the cosine similarity. The neighbours come from
faiss (``IndexFlatIP``, exact) on the CPU, or from a batched matmul + top-k in torch when the features
live on a GPU (or ``backend="torch"``). The training features are streamed: each chunk of rows (read in
its stored dtype from wherever it lives, a memory map included) is normalised, searched exactly, and its
k best merged into running top-k lists, so memory is one chunk plus the (M, k) lists at any N. Two
voting rules:

- majority (``temperature=None``): each of the k neighbours gives its class one vote. Ties between
  classes with the same number of votes go to the class whose voting neighbours have the larger summed
  similarity, then to the smaller class index.
- weighted (``temperature=T``): a neighbour with similarity ``s`` gives its class ``exp(s / T)``, as in
  Wu et al. 2018 (k=200, T=0.07); exact ties go to the smaller class index.

Classes without a vote rank last, by class index. Voting is one ``scatter_add`` per batch of test rows.

- [0] Unsupervised Feature Learning via Non-Parametric Instance Discrimination (Wu et al.), 2018,
  https://arxiv.org/abs/1805.01978
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.errors import ConfigError
from selfsup.eval.linear import ArrayLike, Split, _row_blocks, check_split, resolve_device, topk_accuracy

_SIM_BUDGET = 2**27
"""Largest (test rows x train rows) similarity block the torch path materialises at once (512 MiB)."""

_DB_FLOATS = 2**25
"""Floats in one streamed chunk of training features (128 MiB as float32)."""


def _check_knn_args(k: int, temperature: float | None, n_train: int, backend: str) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if k > n_train:
        raise ConfigError(f"k={k} is larger than the {n_train} training samples")
    if temperature is not None and not temperature > 0:
        raise ConfigError(f"temperature must be positive or None (majority vote), got {temperature!r}")
    if backend not in ("auto", "faiss", "torch"):
        raise ConfigError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")


def _search(
    train_x: torch.Tensor,
    rows: torch.Tensor | None,
    query: torch.Tensor,
    k: int,
    backend: str,
    device: torch.device,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k of every normalised ``query`` row among the training rows ``rows`` (all when None).

    The training rows are streamed in chunks of ``_DB_FLOATS`` floats: each chunk is normalised (a
    chunk-sized copy), searched (a faiss ``IndexFlatIP`` built for the chunk, or matmul + top-k), and its
    best ``k`` are merged with the best so far. Neighbour indices are positions among the used rows.

    Shape:
        query: (M, D) float32, unit rows; returns sims and indices (M, k), best first.
    """
    m, d = query.shape
    best_s = torch.full((m, k), -torch.inf, device=device)
    best_i = torch.zeros((m, k), dtype=torch.long, device=device)
    chunk = max(k, _DB_FLOATS // max(1, d))
    start = 0
    if backend == "faiss":
        import faiss

        query_np = np.ascontiguousarray(query.cpu().numpy(), dtype=np.float32)
    for block in _row_blocks(train_x, rows, chunk):
        bank = F.normalize(block.to(device).float(), dim=1)  # (b, D) unit rows: this chunk's only copy
        kk = min(k, bank.shape[0])
        if backend == "faiss":
            index = faiss.IndexFlatIP(d)
            index.add(np.ascontiguousarray(bank.numpy()))
            sims, idx = (torch.from_numpy(a) for a in index.search(query_np, kk))  # (M, kk)
            del index
        else:
            q_rows = max(1, min(batch_size, _SIM_BUDGET // bank.shape[0]))
            parts = [(q @ bank.t()).topk(kk, dim=1) for q in query.split(q_rows)]  # (b', D) @ (D, b) -> (b', kk)
            sims = torch.cat([p.values for p in parts])
            idx = torch.cat([p.indices for p in parts])
        sims, idx = torch.cat([best_s, sims.to(device)], dim=1), torch.cat([best_i, idx.to(device) + start], dim=1)
        top = sims.topk(k, dim=1)  # merge: (M, k + kk) -> (M, k)
        best_s, best_i = top.values, idx.gather(1, top.indices)
        start += bank.shape[0]
    return best_s, best_i


def _vote(
    sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float | None
) -> torch.Tensor:
    """Class scores (M, C) whose descending order is the prediction order, ties included.

    Majority: ``votes + (summed similarity + k) / (2k + 1)``; the fraction lies in [0, 1), so it only
    orders classes with equal votes (cosine similarities lie in [-1, 1]). Weighted: summed ``exp(s/T)``.

    Shape:
        sims: (M, k); labels: (M, k) class indices of the neighbours.
    """
    sims = sims.double()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64, device=sims.device)
    if temperature is None:
        k = sims.shape[1]
        scores.scatter_add_(1, labels, torch.ones_like(sims))
        sim_sum = torch.zeros_like(scores).scatter_add_(1, labels, sims)
        scores += (sim_sum + k) / (2 * k + 1)
    else:
        scores.scatter_add_(1, labels, (sims / temperature).exp())
    return scores


def knn_scores(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    k: int = 20,
    temperature: float | None = None,
    *,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 4096,
    backend: str = "auto",
    train_rows: ArrayLike | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores of every test row from its k nearest training rows (cosine similarity).

    Args:
        train_x: (N, D) training features (any float dtype, a memory map included: streamed, never copied).
        train_y: (N,) integer training labels.
        test_x: (M, D) test features.
        k: number of neighbours.
        temperature: None for the majority vote, else the temperature of the ``exp(s/T)`` weights.
        num_classes: classes are ``0 .. num_classes-1`` when given, else the distinct training labels.
        device: where to search; the features' device when None.
        batch_size: test rows per search/vote batch.
        backend: "faiss" (CPU), "torch" (matmul + top-k on ``device``) or "auto" (torch on CUDA or when
            faiss is not installed, else faiss).
        train_rows: indices of the training rows to search (a label budget), None for all.
        check_finite: check the features for NaN/inf (False when the caller already did).

    Returns:
        ``(scores, classes)``: (M, C) float64 scores whose stable descending order ranks the classes
        (the tie rule is in the module docstring), and the (C,) label of each column.
    """
    split = check_split(train_x, train_y, test_x, None, num_classes=num_classes, train_rows=train_rows,
                        check_finite=check_finite)
    scores = _scores(split, k, temperature, device, batch_size, backend)
    return scores, split.classes.to(scores.device)


def has_faiss() -> bool:
    """Whether faiss can be imported (the torch search is the fallback)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _scores(
    split: Split,
    k: int,
    temperature: float | None,
    device: str | torch.device | None,
    batch_size: int,
    backend: str,
) -> torch.Tensor:
    n_train = split.train_y.shape[0]
    _check_knn_args(k, temperature, n_train, backend)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    dev = resolve_device(device, split.train_x, split.test_x)
    if backend == "auto":
        backend = "torch" if dev.type == "cuda" or not has_faiss() else "faiss"
    if backend == "faiss":
        dev = torch.device("cpu")
    labels = split.train_y.to(dev)
    query = torch.cat([F.normalize(c.to(dev).float(), dim=1) for c in split.test_x.split(batch_size)])  # (M, D)
    sims, idx = _search(split.train_x, split.rows, query, k, backend, dev, batch_size)
    del query
    out = [
        _vote(s, labels[i], split.num_classes, temperature)
        for s, i in zip(sims.split(batch_size), idx.split(batch_size), strict=True)
    ]
    return torch.cat(out)


def knn_predict(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    k: int = 20,
    temperature: float | None = None,
    *,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 4096,
    backend: str = "auto",
) -> torch.Tensor:
    """Predicted labels (M,) of the test rows (the top class of :func:`knn_scores`, same tie rule)."""
    scores, classes = knn_scores(
        train_x,
        train_y,
        test_x,
        k,
        temperature,
        num_classes=num_classes,
        device=device,
        batch_size=batch_size,
        backend=backend,
    )
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, 0]
    return classes.to(order.device)[order]


def knn_classify(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    k: int = 20,
    temperature: float | None = None,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 4096,
    *,
    backend: str = "auto",
    train_rows: ArrayLike | None = None,
    check_finite: bool = True,
) -> dict[str, Any]:
    """kNN accuracy of frozen features: cosine similarity, majority or temperature-weighted vote.

    The weighted vote with ``k=200, temperature=0.07`` is the protocol of Wu et al. [0]; the majority
    vote with ``k=20`` is the common cheaper variant. Train and test are distinct sets, so no sample is
    excluded from its own neighbourhood.

    - [0] Unsupervised Feature Learning via Non-Parametric Instance Discrimination, 2018,
      https://arxiv.org/abs/1805.01978

    Args:
        train_x: (N, D) training features (torch or numpy, any float dtype, a memory map included; CUDA
            tensors are searched on their GPU). Streamed chunk by chunk, never copied whole.
        train_y: (N,) integer training labels.
        test_x: (M, D) test features.
        test_y: (M,) integer test labels; every one must occur in the used training labels.
        k: number of neighbours (at most the number of used training rows).
        temperature: None for the majority vote, else the temperature of the ``exp(s/T)`` weights.
        num_classes: classes are ``0 .. num_classes-1`` when given, else the distinct training labels.
        device: where to search; the features' device when None.
        batch_size: test rows per search/vote batch.
        backend: "faiss" (CPU), "torch" (matmul + top-k on ``device``) or "auto" (torch on CUDA or when
            faiss is not installed, else faiss).
        train_rows: indices of the training rows to search (a label budget), None for all.
        check_finite: check the features for NaN/inf (False when the caller already did).

    Returns:
        ``{"top1", "top5"}`` in percent (top-5 is top-``min(5, C)``), ``"k"``, ``"temperature"``,
        ``"backend"``, ``"device"``, ``"feature_dtype"``, ``"n_train"``, ``"n_test"``, ``"seconds"``.

    Raises:
        ConfigError: see :func:`selfsup.eval.linear.check_split`; also k < 1, k > N, temperature <= 0.

    Example:
        >>> knn_classify(tr_x, tr_y, te_x, te_y, k=200, temperature=0.07)  # doctest: +SKIP
    """
    start = time.perf_counter()
    split = check_split(train_x, train_y, test_x, test_y, num_classes=num_classes, train_rows=train_rows,
                        check_finite=check_finite)
    dev = resolve_device(device, split.train_x, split.test_x)
    used = backend if backend != "auto" else ("torch" if dev.type == "cuda" or not has_faiss() else "faiss")
    scores = _scores(split, k, temperature, device, batch_size, backend)
    top1, top5 = topk_accuracy(scores, split.test_y.to(scores.device))
    return {
        "top1": top1,
        "top5": top5,
        "k": int(k),
        "temperature": temperature,
        "backend": used,
        "device": str(scores.device),
        "feature_dtype": str(split.train_x.dtype).replace("torch.", ""),
        "n_train": int(split.train_y.shape[0]),
        "n_test": int(split.test_x.shape[0]),
        "seconds": time.perf_counter() - start,
    }
