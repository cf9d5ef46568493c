"""k-nearest-neighbour classification of cached features by cosine similarity.

Features are L2-normalised, so the inner product is the cosine similarity. The neighbours come from
faiss (``IndexFlatIP``, exact) on the CPU, or from a batched matmul + top-k in torch when the features
live on a GPU (or ``backend="torch"``). Two voting rules:

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
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.errors import ConfigError
from selfsup.eval.linear import ArrayLike, check_split, resolve_device, topk_accuracy

_SIM_BUDGET = 2**27
"""Largest (test rows x train rows) similarity block the torch path materialises at once (512 MiB)."""


def _check_knn_args(k: int, temperature: float | None, n_train: int, backend: str) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if k > n_train:
        raise ConfigError(f"k={k} is larger than the {n_train} training samples")
    if temperature is not None and not temperature > 0:
        raise ConfigError(f"temperature must be positive or None (majority vote), got {temperature!r}")
    if backend not in ("auto", "faiss", "torch"):
        raise ConfigError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")


def _searcher(
    train: torch.Tensor, backend: str, batch_size: int
) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    """A function ``(query, k) -> (sims, idx)``: the similarities and indices (b, k) of the k normalised
    ``train`` rows (normalised here) most similar to each normalised query row (b, D), best first.

    The faiss index is built once here, not per query batch.
    """
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(train.shape[1])
        for chunk in train.split(batch_size):  # normalised chunk by chunk: the index holds the only copy
            index.add(np.ascontiguousarray(F.normalize(chunk.cpu().float(), dim=1).numpy(), dtype=np.float32))

        def search_faiss(query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            sims, idx = index.search(np.ascontiguousarray(query.cpu().numpy(), dtype=np.float32), k)
            return torch.from_numpy(sims), torch.from_numpy(idx)

        return search_faiss
    train = F.normalize(train, dim=1)
    rows = max(1, min(batch_size, _SIM_BUDGET // train.shape[0]))

    def search_torch(query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        sims, idx = [], []
        for chunk in query.split(rows):
            s, i = (chunk @ train.t()).topk(k, dim=1)  # (b, D) @ (D, N) -> (b, N) -> (b, k)
            sims.append(s)
            idx.append(i)
        return torch.cat(sims), torch.cat(idx)

    return search_torch


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores of every test row from its k nearest training rows (cosine similarity).

    Args:
        train_x: (N, D) training features.
        train_y: (N,) integer training labels.
        test_x: (M, D) test features.
        k: number of neighbours.
        temperature: None for the majority vote, else the temperature of the ``exp(s/T)`` weights.
        num_classes: classes are ``0 .. num_classes-1`` when given, else the distinct training labels.
        device: where to search; the features' device when None.
        batch_size: test rows per search/vote batch.
        backend: "faiss" (CPU), "torch" (matmul + top-k on ``device``) or "auto" (torch on CUDA, else
            faiss).

    Returns:
        ``(scores, classes)``: (M, C) float64 scores whose stable descending order ranks the classes
        (the tie rule is in the module docstring), and the (C,) label of each column.
    """
    split = check_split(train_x, train_y, test_x, None, num_classes=num_classes)
    scores = _scores(
        split.train_x,
        split.train_y,
        split.test_x,
        split.num_classes,
        k,
        temperature,
        device,
        batch_size,
        backend,
    )
    return scores, split.classes.to(scores.device)


def _scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float | None,
    device: str | torch.device | None,
    batch_size: int,
    backend: str,
) -> torch.Tensor:
    _check_knn_args(k, temperature, train_x.shape[0], backend)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    dev = resolve_device(device, train_x, test_x)
    if backend == "auto":
        backend = "torch" if dev.type == "cuda" else "faiss"
    if backend == "faiss":
        dev = torch.device("cpu")
    search = _searcher(train_x if backend == "faiss" else train_x.to(dev), backend, batch_size)
    labels = train_y.to(dev)
    out = []
    for chunk in test_x.split(batch_size):
        sims, idx = search(F.normalize(chunk.to(dev), dim=1), k)
        out.append(_vote(sims.to(dev), labels[idx.to(dev)], num_classes, temperature))
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
) -> dict[str, Any]:
    """kNN accuracy of frozen features: cosine similarity, majority or temperature-weighted vote.

    The weighted vote with ``k=200, temperature=0.07`` is the protocol of Wu et al. [0]; the majority
    vote with ``k=20`` is the common cheaper variant. Train and test are distinct sets, so no sample is
    excluded from its own neighbourhood.

    - [0] Unsupervised Feature Learning via Non-Parametric Instance Discrimination, 2018,
      https://arxiv.org/abs/1805.01978

    Args:
        train_x: (N, D) training features (torch or numpy; CUDA tensors are searched on their GPU).
        train_y: (N,) integer training labels.
        test_x: (M, D) test features.
        test_y: (M,) integer test labels; every one must occur in ``train_y``.
        k: number of neighbours (at most N).
        temperature: None for the majority vote, else the temperature of the ``exp(s/T)`` weights.
        num_classes: classes are ``0 .. num_classes-1`` when given, else the distinct training labels.
        device: where to search; the features' device when None.
        batch_size: test rows per search/vote batch.
        backend: "faiss" (CPU), "torch" (matmul + top-k on ``device``) or "auto" (torch on CUDA, else
            faiss).

    Returns:
        ``{"top1", "top5"}`` in percent (top-5 is top-``min(5, C)``), ``"k"``, ``"temperature"``,
        ``"n_train"``, ``"n_test"``, ``"seconds"``.

    Raises:
        ConfigError: see :func:`selfsup.eval.linear.check_split`; also k < 1, k > N, temperature <= 0.

    Example:
        >>> knn_classify(tr_x, tr_y, te_x, te_y, k=200, temperature=0.07)  # doctest: +SKIP
    """
    start = time.perf_counter()
    split = check_split(train_x, train_y, test_x, test_y, num_classes=num_classes)
    scores = _scores(
        split.train_x,
        split.train_y,
        split.test_x,
        split.num_classes,
        k,
        temperature,
        device,
        batch_size,
        backend,
    )
    top1, top5 = topk_accuracy(scores, split.test_y.to(scores.device))
    return {
        "top1": top1,
        "top5": top5,
        "k": int(k),
        "temperature": temperature,
        "n_train": int(split.train_x.shape[0]),
        "n_test": int(split.test_x.shape[0]),
        "seconds": time.perf_counter() - start,
    }
