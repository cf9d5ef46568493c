"""Label efficiency: accuracy of frozen features as a function of the number of labels (CPC v2 style).

Every encoder's features are cached once; a sweep then trains only probes: a linear probe
(:func:`~selfsup.eval.linear.linear_probe`) and a kNN classifier (:func:`~selfsup.eval.knn.knn_classify`)
on stratified subsets of the training labels, k labels per class or a percentage of each class, over
several seeds, and reports mean and standard deviation of top-1 and top-5 on the full test set.

Subsets (:func:`subset_indices`) are portable. With per-image keys (the images' paths relative to the
data root, which the harness passes), each class's images are ordered by a SHA-256 hash of
``(seed, key)`` and a budget takes a prefix of that order: the subset is the same set of images
wherever the data lives and in whatever order it is listed. Without keys, each class's indices are
permuted by a generator seeded with a hash of ``(dataset_key, class, seed)``. Either way the same call
gives the same subset on any machine, and for one seed the subsets are nested (k=5 is inside k=10, 1%
is inside 10%). A standard subset list (the ImageNet 1% / 10% files of SimCLR: one image file name or
relative path per line) is read by :func:`subset_from_file` and is one more budget of the sweep.

The sweep never copies training features: every probe gets the subset as row indices into the
(memory-mapped) cache. Its independent fits (encoder x budget x seed x method) can be spread over the
ranks of a distributed job (``shard`` and ``gather``), with results identical to one process.

Result schema of :func:`label_efficiency_sweep` (JSON-serialisable; :func:`selfsup.eval.report.write_json`)::

    {
      "schema": "selfsup.label_efficiency/1",
      "dataset": str,                      # dataset_key
      "num_classes": int, "n_train": int, "n_test": int,
      "mean_labels_per_class": float,      # n_train / num_classes (x position of "all" in plots)
      "seeds": [int, ...],
      "methods": ["linear", "knn", ("finetune")],
      "budgets": [                         # ascending: k budgets, percent budgets, subset files, "all"
        {"name": "k=1", "k": 1, "percent": null, "n_labels": 10, "labels_per_class": 1.0,
         "classes_under_k": []},     # k budgets: [{"class": label, "n": its training images}, ...]
        {"name": "10%", "k": null, "percent": 10.0, "n_labels": 5000, "labels_per_class": 500.0},
        {"name": "all", "k": null, "percent": 100.0, "n_labels": 50000, "labels_per_class": 5000.0}
      ],
      "classes_under_k": {"k=50": {"3": 41}},  # budget -> class (label; the harness: name) -> its count
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
``labels_per_class`` is k for k budgets and ``n_labels / num_classes`` otherwise. A class with fewer
than k training images gives all it has; such classes are listed per budget (``classes_under_k``,
also collected at the top level), so a k budget that is not k for every class is never silent. Linear runs add ``weight_decay``, ``val_top1`` and the fit's ``solver``, ``iterations`` and
``converged``; kNN runs add ``k_neighbours``. A subset-file budget is named ``file:<file name>`` and
records its ``file`` and ``sha256``.

- [0] CPC v2 (Hénaff et al.), 2019, https://arxiv.org/abs/1905.09272
- [1] Revisiting Self-Supervised Visual Representation Learning, 2019, https://arxiv.org/abs/1901.09005
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from selfsup.errors import ConfigError
from selfsup.eval.knn import knn_classify
from selfsup.eval.linear import ArrayLike, as_labels, as_tensor, check_split, linear_probe
from selfsup.names import display_name, from_bytes, name_bytes
from selfsup.progress import make_progress

SCHEMA = "selfsup.label_efficiency/1"
ALL_SEED = 0
"""Hold-out seed of the "all" budget's linear probe, whatever the sweep's seed: the seed of
:func:`~selfsup.eval.linear.linear_probe`'s default, so "all" is the same fit as ``selfsup probe``."""
FIT_COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("fits"),
               TimeElapsedColumn())
"""The sweep's bar: the fit running now, then how many of its fits (encoder x budget x seed x method) are done."""
METHODS = ("linear", "knn", "finetune")
FinetuneFn = Callable[[str, np.ndarray, int], Mapping[str, float]]


def _class_seed(dataset_key: str, cls: int, seed: int) -> int:
    """A 64-bit seed from a stable hash of (dataset_key, class, seed): the same on every run and machine."""
    digest = hashlib.sha256(f"{dataset_key}\x1f{cls}\x1f{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _labels_numpy(labels: ArrayLike) -> np.ndarray:
    return as_labels(labels, "labels").cpu().numpy()


def _key_priority(keys: Sequence[str], seed: int) -> np.ndarray:
    """A 64-bit rank of every key: a SHA-256 hash of ``(seed, key)``, the same on every machine."""
    prefix = f"{seed}\x1f".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + name_bytes(k)).digest()[:8], "little") for k in keys),
        dtype=np.uint64,
        count=len(keys),
    )


def _class_orders(
    y: np.ndarray, seed: int, dataset_key: str, keys: Sequence[str] | None
) -> list[np.ndarray]:
    """Each class's indices in the order its budgets take them (a prefix per budget)."""
    if keys is not None and len(keys) != len(y):
        raise ConfigError(f"keys must give one key per label: {len(keys)} keys for {len(y)} labels")
    order = np.argsort(y, kind="stable")  # indices grouped by class, ascending within a class
    classes, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    if keys is not None:
        prio = _key_priority(keys, seed)
        by_class = order[np.lexsort((prio[order], y[order]))]  # by class, then by hash rank
        return [by_class[s : s + n] for s, n in zip(starts.tolist(), counts.tolist(), strict=True)]
    out = []
    for cls, start, n_c in zip(classes.tolist(), starts.tolist(), counts.tolist(), strict=True):
        perm = np.random.default_rng(_class_seed(dataset_key, cls, seed)).permutation(n_c)
        out.append(order[start + perm])
    return out


def _check_budget(k: int | None, percent: float | None) -> None:
    if k is not None and percent is not None:
        raise ConfigError(f"give k or percent, not both (got k={k!r}, percent={percent!r})")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise ConfigError(f"k (labels per class) must be a positive integer, got {k!r}")
    if percent is not None and not 0 < percent <= 100:
        raise ConfigError(f"percent must lie in (0, 100], got {percent!r}")


def _take_prefixes(orders: list[np.ndarray], k: int | None, percent: float | None) -> np.ndarray:
    chosen = []
    for idx in orders:
        if k is not None:
            take = min(int(k), len(idx))
        else:
            # round() first so that e.g. 7% of 100 is 7, not ceil(7.000000000000001) = 8
            take = max(1, math.ceil(round(percent * len(idx) / 100.0, 9)))
        chosen.append(idx[:take])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def subset_indices(
    labels: ArrayLike,
    k: int | None = None,
    percent: float | None = None,
    seed: int = 0,
    dataset_key: str = "",
    keys: Sequence[str] | None = None,
) -> np.ndarray:
    """Indices of a deterministic stratified subset: k labels per class, or a percentage of each class.

    With ``keys`` (one string per sample, e.g. the image's path relative to the data root), each class's
    samples are ordered by a SHA-256 hash of ``(seed, key)``: the subset is a set of keys that does not
    depend on the row order, the data's location or ``dataset_key``. Without keys, each class's indices
    (ascending) are permuted by a generator seeded with a SHA-256 hash of ``(dataset_key, c, seed)``.
    ``k`` takes the first ``k`` of a class's order (all of a class that has fewer than ``k``),
    ``percent`` the first ``ceil(percent / 100 * n_c)`` (at least 1). Hence subsets are nested across
    budgets for one seed, and a class's subset does not depend on the other classes' labels. With
    neither ``k`` nor ``percent`` all indices are returned.

    Args:
        labels: (N,) integer labels.
        k: labels per class (>= 1).
        percent: percentage of each class, in (0, 100].
        seed: subset seed.
        dataset_key: name of the dataset, so different datasets get unrelated subsets (without keys).
        keys: (N,) per-sample keys (relative image paths), for portable subsets.

    Returns:
        Sorted int64 indices into ``labels``.

    Raises:
        ConfigError: both ``k`` and ``percent`` given, k < 1, percent outside (0, 100], or a key count
            that differs from the label count.

    Example:
        >>> labels = [0, 0, 1, 1, 1]
        >>> idx = subset_indices(labels, k=1, dataset_key="toy")
        >>> sorted(labels[i] for i in idx)
        [0, 1]
    """
    y = _labels_numpy(labels)
    _check_budget(k, percent)
    if k is None and percent is None:
        return np.arange(len(y), dtype=np.int64)
    return _take_prefixes(_class_orders(y, seed, dataset_key, keys), k, percent)


def read_subset_file(path: str | Path) -> list[str]:
    """The entries of a subset list: one image file name or relative path per line (blank lines and
    ``#`` comments skipped), e.g. SimCLR's ``1percent.txt`` / ``10percent.txt`` for ImageNet.

    The file is read as bytes, and each line taken as the file system names it (:func:`selfsup.names.from_bytes`),
    so a name that is not UTF-8 (``b'\\xff\\xfeimg.jpg'``) matches the file it names; a UTF-8 byte-order mark is
    ignored."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"subset file {path} is a folder; give a text file listing one image per line")
    if not path.is_file():
        raise ConfigError(f"subset file {path} does not exist")
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    lines = [from_bytes(ln.strip()).replace("\\", "/").removeprefix("./") for ln in raw.splitlines()]
    entries = [ln for ln in lines if ln and not ln.startswith("#")]
    if not entries:
        raise ConfigError(f"subset file {path} lists no image")
    return entries


def subset_from_file(path: str | Path, keys: Sequence[str]) -> np.ndarray:
    """Sorted indices of the samples a subset list names.

    A line matches a sample whose key (its path relative to the data root, ``/``-separated) equals the
    line or ends with ``/`` + the line; so a bare file name (``n01440764_10026.JPEG``, the format of the
    public ImageNet 1% / 10% lists) and a relative path (``n01440764/n01440764_10026.JPEG``) both work.

    Raises:
        ConfigError: no keys (the data has no file names), a line naming no sample or several samples.
    """
    if keys is None or not len(keys):
        raise ConfigError("a subset file needs the images' file names, and this data has none (use --ks/--percents)")
    entries = read_subset_file(path)
    by_name: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_name.setdefault(key.rsplit("/", 1)[-1], []).append(i)
    chosen, missing, ambiguous = [], [], []
    for entry in entries:
        hits = [i for i in by_name.get(entry.rsplit("/", 1)[-1], ()) if keys[i] == entry or keys[i].endswith("/" + entry)]
        if not hits:
            missing.append(entry)
        elif len(hits) > 1:
            ambiguous.append(entry)
        else:
            chosen.append(hits[0])
    if missing:
        raise ConfigError(f"subset file {path}: {len(missing)} of {len(entries)} entries match no image "
                          f"of the data, e.g. {display_name(missing[0])!r}")
    if ambiguous:
        raise ConfigError(f"subset file {path}: {display_name(ambiguous[0])!r} matches several images; give relative paths")
    owner: dict[int, str] = {}  # every entry matched one image here; two naming one image made the budget short
    for i, entry in zip(chosen, entries, strict=True):
        if i in owner:
            same = "is listed twice" if owner[i] == entry else f"and {display_name(entry)!r} name the same image"
            raise ConfigError(f"subset file {path}: {display_name(owner[i])!r} {same} ({len(entries)} lines, "
                              f"{len(set(chosen))} images); list each image once")
        owner[i] = entry
    return np.unique(np.asarray(chosen, dtype=np.int64))


def _budgets(
    train_y: np.ndarray,
    ks: Iterable[int | None],
    percents: Iterable[float],
    dataset_key: str,
    subset_files: Sequence[str | Path] = (),
    keys: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The budgets in plotting order, and the fixed subsets of the subset files by budget name."""
    labels, counts = np.unique(train_y, return_counts=True)
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
                # classes with fewer than k training images: the budget takes all of theirs
                "classes_under_k": [{"class": int(cls), "n": int(n)}
                                    for cls, n in zip(labels.tolist(), counts.tolist(), strict=True) if n < k],
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
    fixed: dict[str, np.ndarray] = {}
    for f in subset_files:
        idx = subset_from_file(f, keys)
        name = f"file:{Path(f).name}"
        if name in fixed:
            raise ConfigError(f"two subset files are named {Path(f).name}; rename one")
        fixed[name] = idx
        digest = hashlib.sha256(Path(f).read_bytes()).hexdigest()
        budgets.append({"name": name, "k": None, "percent": None, "n_labels": int(len(idx)),
                        "labels_per_class": len(idx) / c, "file": str(f), "sha256": digest})
    if want_all:
        budgets.append({"name": "all", "k": None, "percent": 100.0, "n_labels": n, "labels_per_class": n / c})
    if not budgets:
        raise ConfigError(
            "no label budget left: give ks and/or percents (ks above the largest class are dropped)"
        )
    return budgets, fixed


def _summary(budget: Mapping[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {key: budget[key] for key in ("k", "percent", "n_labels")}
    out["budget"] = budget["name"]
    for metric in ("top1", "top5"):
        vals = np.array([float(r[metric]) for r in runs])
        out[f"{metric}_mean"] = float(vals.mean())
        out[f"{metric}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    out["runs"] = runs
    return out


def assign_jobs(costs: Sequence[float], world: int) -> list[int]:
    """The rank of every job: longest first, each to the least-loaded rank (deterministic)."""
    load = [0.0] * world
    ranks = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        ranks[j] = r
        load[r] += costs[j]
    return ranks


def _on_device(data: tuple, device: str | torch.device | None) -> tuple:
    """The encoder's features moved once to a CUDA ``device`` when they fit (kept there for all its fits)."""
    if device is None or torch.device(device).type != "cuda":
        return data
    tx, ty, vx, vy = (as_tensor(a, "features") for a in data)
    need = tx.numel() * tx.element_size() + vx.numel() * vx.element_size()
    if need > 0.5 * torch.cuda.mem_get_info(torch.device(device))[0]:
        return data  # too big: every fit streams its rows from host memory
    return tx.to(device), ty, vx.to(device), vy


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
    keys: Sequence[str] | None = None,
    subset_files: Sequence[str | Path] = (),
    device: str | torch.device | None = None,
    shard: tuple[int, int] | None = None,
    gather: Callable[[dict], dict] | None = None,
) -> dict[str, Any]:
    """Probe every encoder's cached features at every label budget and seed; mean and std over seeds.

    For each encoder, budget and seed, the training labels are cut to :func:`subset_indices` (the same
    subset for every encoder), then a linear probe and/or a kNN classifier (``k = min(knn_k, labels of the smallest class in the subset)``)
    are fitted on the subset (given as row indices: the features are never copied) and scored on the
    whole test set. Deterministic results are not recomputed: kNN (and the "all" budget's kNN across
    seeds) runs once per distinct subset. With every label there is nothing to sample, so the "all"
    budget's linear probe is one fit for all seeds, with the hold-out rows of ``selfsup probe``
    (seed :data:`ALL_SEED`): the same fit and the same result as the probe (its std is 0).
    Protocol of CPC v2 [0].

    - [0] CPC v2, 2019, https://arxiv.org/abs/1905.09272

    Args:
        encoders: name -> ``(train_x, train_y, test_x, test_y)`` cached features; labels must be the same
            for every encoder. Baselines are named with a "random" or "pixels" prefix by convention.
        ks: labels per class; None means all labels. ks above the largest class are dropped.
        percents: percentages of each class's labels (100 is the "all" budget).
        seeds: subset seeds (also the linear probe's hold-out seed, except at "all": see above).
        methods: any of "linear", "knn", "finetune"; "finetune" is added when ``finetune_fn`` is given.
        dataset_key: dataset name: recorded, and part of the subset seed when there are no ``keys``.
        progress: show a rich progress bar.
        finetune_fn: ``(encoder_name, subset_indices, seed) -> {"top1", "top5", ...}``, the hook for
            end-to-end fine-tuning on the subset; its results appear under method "finetune".
        knn_k: neighbours of the kNN classifier (capped at the smallest class count of the subset).
        knn_temperature: None for the majority vote, else the weighted vote's temperature.
        linear_kwargs: extra keyword arguments of :func:`~selfsup.eval.linear.linear_probe`.
        knn_kwargs: extra keyword arguments of :func:`~selfsup.eval.knn.knn_classify`.
        keys: (N,) per-training-image keys (paths relative to the data root): portable subsets, and
            needed by ``subset_files``.
        subset_files: subset lists (:func:`subset_from_file`), each one more budget (the same subset for
            every seed; the seed still varies the linear probe's hold-out).
        device: where the probes run ("cuda": each encoder's features are moved there once when they fit).
        shard: ``(rank, world)``: run only this rank's share of the fits (longest first, balanced by
            label count); finetune runs stay on rank 0.
        gather: merges the ranks' ``{job: record}`` dicts into one on every rank (e.g. with
            ``torch.distributed.all_gather_object``); required with ``shard``.

    Returns:
        The result dict described in the module docstring.

    Raises:
        ConfigError: no encoder, labels differing between encoders, unknown method, "finetune" without
            ``finetune_fn``, no seed or no budget, bad features (see
            :func:`~selfsup.eval.linear.check_split`), a bad subset file.
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
    if shard is not None and gather is None:
        raise ConfigError("a sharded sweep needs a gather function")
    rank, world = shard if shard is not None else (0, 1)

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
    budgets, fixed = _budgets(ref_train_y, ks, percents, dataset_key, subset_files, keys)
    subsets: dict[tuple[str, int], np.ndarray] = {}
    for s in seeds:
        orders = None
        for b in budgets:
            if b["name"] in fixed:
                subsets[b["name"], s] = fixed[b["name"]]
            elif b["name"] == "all":
                subsets[b["name"], s] = np.arange(len(ref_train_y), dtype=np.int64)
            else:
                orders = _class_orders(ref_train_y, s, dataset_key, keys) if orders is None else orders
                subsets[b["name"], s] = _take_prefixes(orders, b["k"], b["percent"])
    linear_kwargs, knn_kwargs = dict(linear_kwargs or {}), dict(knn_kwargs or {})
    if device is not None:
        linear_kwargs.setdefault("device", device)
        knn_kwargs.setdefault("device", device)

    # Every distinct fit once: kNN is deterministic given its subset, so seeds sharing a subset share it;
    # the "all" budget's linear probe is the fit of `selfsup probe` (hold-out seed ALL_SEED), once for all seeds.
    def fit_seed(budget: str, method: str, seed: int) -> int:
        return ALL_SEED if budget == "all" and method == "linear" else seed

    def job_key(name: str, method: str, idx: np.ndarray, seed: int) -> tuple:
        digest = hashlib.sha1(idx.tobytes()).hexdigest()
        return (name, method, digest) if method == "knn" else (name, method, digest, seed)

    jobs: dict[tuple, tuple[str, str, np.ndarray, int]] = {}
    for name in encoders:
        for b in budgets:
            for seed in seeds:
                for method in methods:
                    idx, fs = subsets[b["name"], seed], fit_seed(b["name"], method, seed)
                    jobs.setdefault(job_key(name, method, idx, fs), (name, method, idx, fs))
    keys_list = list(jobs)
    owner = assign_jobs([len(jobs[j][2]) for j in keys_list], world)
    mine = [j for j, r in zip(keys_list, owner, strict=True)
            if (r == rank and jobs[j][1] != "finetune") or (jobs[j][1] == "finetune" and rank == 0)]

    done: dict[tuple, dict[str, Any]] = {}
    with make_progress(*FIT_COLUMNS, enabled=progress, transient=True) as bar:
        task = bar.add_task("label efficiency", total=len(mine))
        for name in encoders:
            todo = [j for j in mine if jobs[j][0] == name]
            if not todo:
                continue
            data = _on_device(encoders[name], linear_kwargs.get("device"))
            for j in todo:
                _, method, idx, seed = jobs[j]
                bar.update(task, description=f"{name} {method} {len(idx)} labels seed {seed}")
                done[j] = _run(method, name, *data, idx, seed, knn_k, knn_temperature, linear_kwargs,
                               knn_kwargs, finetune_fn)
                bar.advance(task)
            del data
    if shard is not None:
        done = gather(done)

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in encoders:
        results[name] = {m: [] for m in methods}
        for b in budgets:
            for method in methods:
                runs = [{"seed": seed, **done[job_key(name, method, subsets[b["name"], seed],
                                                      fit_seed(b["name"], method, seed))]}
                        for seed in seeds]
                results[name][method].append(_summary(b, runs))

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
        "classes_under_k": {b["name"]: {str(u["class"]): u["n"] for u in b["classes_under_k"]}
                            for b in budgets if b.get("classes_under_k")},
        "subsets": "keys (relative image paths)" if keys is not None else f"dataset_key {dataset_key!r} and row order",
        "world_size": world,
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
    """One probe on one subset (row indices into the features); the JSON-ready run record without its seed."""
    rows = None if len(idx) == len(train_y) else torch.from_numpy(idx)
    if method == "linear":
        res = linear_probe(train_x, train_y, test_x, test_y, train_rows=rows, seed=seed, check_finite=False,
                           **linear_kwargs)
        keep = ("top1", "top5", "weight_decay", "val_top1", "seconds")
        return {**{key: res[key] for key in keep}, **{key: res["fit"][key] for key in ("solver", "iterations", "converged")}}
    if method == "knn":
        # No more neighbours than the smallest class has labels: with k labels per class, a 20-NN vote
        # would be outvoted by other classes by construction.
        counts = np.unique(_labels_numpy(train_y)[idx], return_counts=True)[1]
        k = min(knn_k, int(counts.min()))
        res = knn_classify(train_x, train_y, test_x, test_y, k, knn_temperature, train_rows=rows,
                           check_finite=False, **knn_kwargs)
        return {"top1": res["top1"], "top5": res["top5"], "k_neighbours": k, "seconds": res["seconds"]}
    res = dict(finetune_fn(name, idx, seed))
    if "top1" not in res or "top5" not in res:
        raise ConfigError(f"finetune_fn must return a dict with 'top1' and 'top5', got keys {sorted(res)}")
    return {
        key: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
        for key, v in res.items()
    }
