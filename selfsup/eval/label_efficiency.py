"""Label efficiency: accuracy of frozen features as a function of the number of labels (CPC v2 style).

Every encoder's features are cached once; a sweep then trains only probes: a linear probe
(:func:`~selfsup.eval.linear.linear_probe`) and a kNN classifier (:func:`~selfsup.eval.knn.knn_classify`)
on stratified subsets of the training labels, k labels per class or a percentage of each class, over
several seeds, and reports mean and standard deviation of top-1 and top-5 on the full test set.

Subsets (:func:`subset_indices`) depend only on ``(dataset_key, labels, budget, seed)``: each class's
indices are put in an order drawn from a generator seeded by a SHA-256 hash of
``(dataset_key, class, seed)``, and a budget takes a prefix of that order. So the same call always gives
the same subset on any machine, and for one seed the subsets are nested (k=5 is inside k=10, 1% is
inside 10%).

Result schema of :func:`label_efficiency_sweep` (JSON-serialisable; :func:`selfsup.eval.report.write_json`)::

    {
      "schema": "selfsup.label_efficiency/1",
      "dataset": str,                      # dataset_key
      "num_classes": int, "n_train": int, "n_test": int,
      "mean_labels_per_class": float,      # n_train / num_classes (x position of "all" in plots)
      "seeds": [int, ...],
      "methods": ["linear", "knn", ("finetune")],
      "budgets": [                         # ascending: k budgets, then percent budgets, then "all"
        {"name": "k=1", "k": 1, "percent": null, "n_labels": 10, "labels_per_class": 1.0},
        {"name": "10%", "k": null, "percent": 10.0, "n_labels": 5000, "labels_per_class": 500.0},
        {"name": "all", "k": null, "percent": 100.0, "n_labels": 50000, "labels_per_class": 5000.0}
      ],
      "results": {
        encoder_name: {
          method: [                        # one entry per budget, in "budgets" order
            {"budget": "k=1", "k": 1, "percent": null, "n_labels": 10,
             "top1_mean": float, "top1_std": float, "top5_mean": float, "top5_std": float,
             "runs": [{"seed": 0, "top1": float, "top5": float, ...method extras}, ...]}
          ]
        }
      },
      "seconds": float
    }

Accuracies are in percent; ``*_std`` is the sample standard deviation over seeds (0 for one seed).
``labels_per_class`` is k for k budgets (some classes may have fewer) and ``n_labels / num_classes``
otherwise. Linear runs add ``weight_decay`` and ``val_top1``; kNN runs add ``k_neighbours``.

- [0] CPC v2 (Hénaff et al.), 2019, https://arxiv.org/abs/1905.09272
- [1] Revisiting Self-Supervised Visual Representation Learning, 2019, https://arxiv.org/abs/1901.09005
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from selfsup.errors import ConfigError
from selfsup.eval.knn import knn_classify
from selfsup.eval.linear import ArrayLike, as_labels, check_split, linear_probe

SCHEMA = "selfsup.label_efficiency/1"
METHODS = ("linear", "knn", "finetune")
FinetuneFn = Callable[[str, np.ndarray, int], Mapping[str, float]]


def _class_seed(dataset_key: str, cls: int, seed: int) -> int:
    """A 64-bit seed from a stable hash of (dataset_key, class, seed): the same on every run and machine."""
    digest = hashlib.sha256(f"{dataset_key}\x1f{cls}\x1f{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _labels_numpy(labels: ArrayLike) -> np.ndarray:
    return as_labels(labels, "labels").cpu().numpy()


def subset_indices(
    labels: ArrayLike,
    k: int | None = None,
    percent: float | None = None,
    seed: int = 0,
    dataset_key: str = "",
) -> np.ndarray:
    """Indices of a deterministic stratified subset: k labels per class, or a percentage of each class.

    For every class ``c``, the class's indices (ascending) are permuted by a generator seeded with a
    SHA-256 hash of ``(dataset_key, c, seed)``; ``k`` takes the first ``k`` of that permutation (all of a
    class that has fewer than ``k``), ``percent`` the first ``ceil(percent / 100 * n_c)`` (at least 1).
    Hence subsets are nested across budgets for one seed, and a class's subset does not depend on the
    other classes' labels. With neither ``k`` nor ``percent`` all indices are returned.

    Args:
        labels: (N,) integer labels.
        k: labels per class (>= 1).
        percent: percentage of each class, in (0, 100].
        seed: subset seed.
        dataset_key: name of the dataset, so different datasets get unrelated subsets.

    Returns:
        Sorted int64 indices into ``labels``.

    Raises:
        ConfigError: both ``k`` and ``percent`` given, k < 1, or percent outside (0, 100].

    Example:
        >>> labels = [0, 0, 1, 1, 1]
        >>> idx = subset_indices(labels, k=1, dataset_key="toy")
        >>> sorted(labels[i] for i in idx)
        [0, 1]
    """
    y = _labels_numpy(labels)
    if k is not None and percent is not None:
        raise ConfigError(f"give k or percent, not both (got k={k!r}, percent={percent!r})")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise ConfigError(f"k (labels per class) must be a positive integer, got {k!r}")
    if percent is not None and not 0 < percent <= 100:
        raise ConfigError(f"percent must lie in (0, 100], got {percent!r}")
    if k is None and percent is None:
        return np.arange(len(y), dtype=np.int64)
    order = np.argsort(y, kind="stable")  # indices grouped by class, ascending within a class
    classes, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    chosen = []
    for cls, start, n_c in zip(classes.tolist(), starts.tolist(), counts.tolist(), strict=True):
        if k is not None:
            take = min(int(k), n_c)
        else:
            # round() first so that e.g. 7% of 100 is 7, not ceil(7.000000000000001) = 8
            take = max(1, math.ceil(round(percent * n_c / 100.0, 9)))
        perm = np.random.default_rng(_class_seed(dataset_key, cls, seed)).permutation(n_c)
        chosen.append(order[start + perm[:take]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _take(x: ArrayLike, idx: np.ndarray) -> ArrayLike:
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(idx).to(x.device)]
    return x[idx]


def _budgets(
    train_y: np.ndarray, ks: Iterable[int | None], percents: Iterable[float], dataset_key: str
) -> list[dict[str, Any]]:
    counts = np.bincount(np.unique(train_y, return_inverse=True)[1])
    n, c = int(len(train_y)), int(len(counts))
    budgets: list[dict[str, Any]] = []
    for k in sorted({k for k in ks if k is not None}):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"ks must be positive integers or None, got {k!r}")
        if k > counts.max():
            continue  # more than the largest class: the same subset as "all"
        n_labels = int(np.minimum(counts, k).sum())
        budgets.append(
            {
                "name": f"k={k}",
                "k": int(k),
                "percent": None,
                "n_labels": n_labels,
                "labels_per_class": float(k),
            }
        )
    want_all = any(k is None for k in ks)
    for p in sorted({float(p) for p in percents}):
        if not 0 < p <= 100:
            raise ConfigError(f"percents must lie in (0, 100], got {p!r}")
        if p == 100:
            want_all = True
            continue
        n_labels = int(len(subset_indices(train_y, percent=p, dataset_key=dataset_key)))
        budgets.append(
            {
                "name": f"{p:g}%",
                "k": None,
                "percent": p,
                "n_labels": n_labels,
                "labels_per_class": n_labels / c,
            }
        )
    if want_all:
        budgets.append({"name": "all", "k": None, "percent": 100.0, "n_labels": n, "labels_per_class": n / c})
    if not budgets:
        raise ConfigError(
            "no label budget left: give ks and/or percents (ks above the largest class are dropped)"
        )
    return budgets


def _summary(budget: Mapping[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {key: budget[key] for key in ("k", "percent", "n_labels")}
    out["budget"] = budget["name"]
    for metric in ("top1", "top5"):
        vals = np.array([float(r[metric]) for r in runs])
        out[f"{metric}_mean"] = float(vals.mean())
        out[f"{metric}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    out["runs"] = runs
    return out


def label_efficiency_sweep(
    encoders: Mapping[str, tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike]],
    ks: Sequence[int | None] = (1, 2, 5, 10, 20, 50, 100, None),
    percents: Sequence[float] = (),
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = ("linear", "knn"),
    dataset_key: str = "",
    progress: bool = True,
    finetune_fn: FinetuneFn | None = None,
    *,
    knn_k: int = 20,
    knn_temperature: float | None = None,
    linear_kwargs: Mapping[str, Any] | None = None,
    knn_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Probe every encoder's cached features at every label budget and seed; mean and std over seeds.

    For each encoder, budget and seed, the training labels are cut to :func:`subset_indices` (the same
    subset for every encoder), then a linear probe and/or a kNN classifier (``k = min(knn_k, labels of the smallest class in the subset)``)
    are fitted on the subset and scored on the whole test set. Deterministic results are not recomputed:
    kNN (and the "all" budget's kNN across seeds) runs once per distinct subset. Protocol of CPC v2 [0].

    - [0] CPC v2, 2019, https://arxiv.org/abs/1905.09272

    Args:
        encoders: name -> ``(train_x, train_y, test_x, test_y)`` cached features; labels must be the same
            for every encoder. Baselines are named with a "random" or "pixels" prefix by convention.
        ks: labels per class; None means all labels. ks above the largest class are dropped.
        percents: percentages of each class's labels (100 is the "all" budget).
        seeds: subset seeds (also the linear probe's hold-out seed).
        methods: any of "linear", "knn", "finetune"; "finetune" is added when ``finetune_fn`` is given.
        dataset_key: dataset name: recorded, and part of the subset seed.
        progress: show a rich progress bar.
        finetune_fn: ``(encoder_name, subset_indices, seed) -> {"top1", "top5", ...}``, the hook for
            end-to-end fine-tuning on the subset; its results appear under method "finetune".
        knn_k: neighbours of the kNN classifier (capped at the smallest class count of the subset).
        knn_temperature: None for the majority vote, else the weighted vote's temperature.
        linear_kwargs: extra keyword arguments of :func:`~selfsup.eval.linear.linear_probe`.
        knn_kwargs: extra keyword arguments of :func:`~selfsup.eval.knn.knn_classify`.

    Returns:
        The result dict described in the module docstring.

    Raises:
        ConfigError: no encoder, labels differing between encoders, unknown method, "finetune" without
            ``finetune_fn``, no seed or no budget, bad features (see
            :func:`~selfsup.eval.linear.check_split`).
    """
    start = time.perf_counter()
    if not encoders:
        raise ConfigError("label_efficiency_sweep needs at least one encoder's features")
    methods = list(dict.fromkeys(methods))
    if finetune_fn is not None and "finetune" not in methods:
        methods.append("finetune")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"methods must be a non-empty subset of {METHODS}, got {tuple(methods)!r}")
    if "finetune" in methods and finetune_fn is None:
        raise ConfigError("method 'finetune' needs a finetune_fn")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("seeds must not be empty")

    ref_train_y = ref_test_y = None
    for name, data in encoders.items():
        if not isinstance(data, (tuple, list)) or len(data) != 4:
            raise ConfigError(f"encoder {name!r}: expected (train_x, train_y, test_x, test_y)")
        split = check_split(*data)  # fail before hours of probing, not in the middle
        train_y, test_y = _labels_numpy(data[1]), _labels_numpy(data[3])
        if ref_train_y is None:
            ref_train_y, ref_test_y, ref_split = train_y, test_y, split
        elif not (np.array_equal(train_y, ref_train_y) and np.array_equal(test_y, ref_test_y)):
            raise ConfigError(f"encoder {name!r} has different labels from {next(iter(encoders))!r}")
    budgets = _budgets(ref_train_y, ks, percents, dataset_key)
    subsets = {
        (b["name"], s): subset_indices(
            ref_train_y, b["k"], None if b["percent"] == 100 else b["percent"], s, dataset_key
        )
        for b in budgets
        for s in seeds
    }
    linear_kwargs, knn_kwargs = dict(linear_kwargs or {}), dict(knn_kwargs or {})

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(
            "label efficiency", total=len(encoders) * len(budgets) * len(seeds) * len(methods)
        )
        for name, (train_x, train_y, test_x, test_y) in encoders.items():
            results[name] = {m: [] for m in methods}
            for budget in budgets:
                runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
                memo: dict[tuple, dict[str, Any]] = {}
                for seed in seeds:
                    idx = subsets[budget["name"], seed]
                    key = hashlib.sha1(idx.tobytes()).hexdigest()
                    for method in methods:
                        bar.update(task, description=f"{name} {method} {budget['name']} seed {seed}")
                        memo_key = (method, key) if method == "knn" else (method, key, seed)
                        if memo_key not in memo:
                            memo[memo_key] = _run(
                                method, name, train_x, train_y, test_x, test_y, idx, seed,
                                knn_k, knn_temperature, linear_kwargs, knn_kwargs, finetune_fn,
                            )  # fmt: skip
                        runs[method].append({"seed": seed, **memo[memo_key]})
                        bar.advance(task)
                for method in methods:
                    results[name][method].append(_summary(budget, runs[method]))

    n_train, c = int(ref_split.train_x.shape[0]), ref_split.num_classes
    return {
        "schema": SCHEMA,
        "dataset": dataset_key,
        "num_classes": c,
        "n_train": n_train,
        "n_test": int(ref_split.test_x.shape[0]),
        "mean_labels_per_class": n_train / c,
        "seeds": seeds,
        "methods": methods,
        "budgets": budgets,
        "results": results,
        "seconds": time.perf_counter() - start,
    }


def _run(
    method: str,
    name: str,
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    idx: np.ndarray,
    seed: int,
    knn_k: int,
    knn_temperature: float | None,
    linear_kwargs: dict[str, Any],
    knn_kwargs: dict[str, Any],
    finetune_fn: FinetuneFn | None,
) -> dict[str, Any]:
    """One probe on one subset; the JSON-ready run record without its seed."""
    if method == "linear":
        res = linear_probe(
            _take(train_x, idx), _take(train_y, idx), test_x, test_y, seed=seed, **linear_kwargs
        )
        keep = ("top1", "top5", "weight_decay", "val_top1", "seconds")
        return {key: res[key] for key in keep}
    if method == "knn":
        # No more neighbours than the smallest class has labels: with k labels per class, a 20-NN vote
        # would be outvoted by other classes by construction.
        counts = np.unique(_labels_numpy(train_y)[idx], return_counts=True)[1]
        k = min(knn_k, int(counts.min()))
        res = knn_classify(
            _take(train_x, idx), _take(train_y, idx), test_x, test_y, k, knn_temperature, **knn_kwargs
        )
        return {"top1": res["top1"], "top5": res["top5"], "k_neighbours": k, "seconds": res["seconds"]}
    res = dict(finetune_fn(name, idx, seed))
    if "top1" not in res or "top5" not in res:
        raise ConfigError(f"finetune_fn must return a dict with 'top1' and 'top5', got keys {sorted(res)}")
    return {
        key: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
        for key, v in res.items()
    }
