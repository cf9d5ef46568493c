"""Pictures of a run: nearest-neighbour retrieval, a 2-D embedding map, training curves.

Each function returns a matplotlib ``Figure`` (so a notebook shows it inline) and never touches the
screen; :func:`save` writes one as a PNG. They read what the harness already cached (features, the
dataset's uint8 images, ``metrics.csv``), so a picture costs no backbone pass.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from selfsup.errors import ConfigError
from selfsup.names import display_name, displayable_figure

WRONG = "#d62728"
RIGHT = "#2ca02c"


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parent folders made); the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    displayable_figure(fig).savefig(path, dpi=fig.dpi, bbox_inches="tight")
    return path


def _image(dataset, i: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 image ``i`` of a selfsup dataset (array-backed or streamed)."""
    images = getattr(dataset, "images", None)
    if images is not None:
        return np.asarray(images[i])
    return dataset[i][0].permute(1, 2, 0).numpy()


def _normalised(x: np.ndarray) -> torch.Tensor:
    """L2-normalised float32 rows (a copy of this chunk only; float16 caches are widened here)."""
    return torch.nn.functional.normalize(torch.from_numpy(np.array(x, dtype=np.float32)), dim=1)


def nearest_neighbours(train_x: np.ndarray, query_x: np.ndarray, k: int, chunk: int = 65536) -> np.ndarray:
    """Indices ``(Q, k)`` of each query's ``k`` most cosine-similar training rows, streamed over chunks.

    The training features are read one chunk at a time (they may be a memory map of any size) and
    the running top-``k`` is merged per chunk, so memory stays at one chunk plus ``Q x k``.
    """
    if k < 1 or k > len(train_x):
        raise ConfigError(f"k must be in [1, {len(train_x)}], got {k!r}")
    q = _normalised(query_x)
    best_s = torch.full((len(q), k), -float("inf"))
    best_i = torch.zeros((len(q), k), dtype=torch.long)
    for start in range(0, len(train_x), chunk):
        block = _normalised(train_x[start : start + chunk])  # (c, D)
        sims = q @ block.T  # (Q, c)
        s = torch.cat([best_s, sims], dim=1)
        i = torch.cat([best_i, torch.arange(start, start + len(block)).expand(len(q), -1)], dim=1)
        best_s, top = s.topk(k, dim=1)
        best_i = i.gather(1, top)
    return best_i.numpy()


def retrieval_grid(
    train_set, test_set, train_x: np.ndarray, test_x: np.ndarray, queries: int = 8, k: int = 8, seed: int = 0,
    title: str | None = None,
):
    """Query test images (left column) and their ``k`` nearest training images in feature space.

    Neighbours of another class than the query get a red frame and their class name in red; matches
    a green frame. Queries are one per class first (then random), drawn with ``seed``.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(test_set.labels)
    per_class = [rng.choice(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rng.shuffle(per_class)
    chosen = np.array(per_class[:queries])
    if len(chosen) < queries:
        rest = np.setdiff1d(np.arange(len(labels)), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, queries - len(chosen), replace=False)])
    nn_idx = nearest_neighbours(train_x, np.asarray(test_x)[chosen], k)
    classes = [display_name(c) for c in getattr(test_set, "classes", [])]  # bytes that are not UTF-8: U+FFFD
    train_labels = np.asarray(train_set.labels)
    height = 1.3 * len(chosen) + 0.6
    fig = _figure(1.15 * (k + 1), height)
    # the grid starts just under the two-line title (matplotlib's default top=0.88 left a blank inch)
    axes = fig.subplots(len(chosen), k + 1, squeeze=False, gridspec_kw={
        "top": 1 - 0.85 / height, "bottom": 0.1 / height, "left": 0.01, "right": 0.99, "hspace": 0.3})
    wrong = 0
    for r, qi in enumerate(chosen):
        row = axes[r]
        qlabel = int(labels[qi])
        row[0].imshow(_image(test_set, int(qi)))
        row[0].set_title(f"query: {classes[qlabel] if classes else qlabel}", fontsize=8, fontweight="bold")
        for c, ti in enumerate(nn_idx[r], start=1):
            tl = int(train_labels[ti])
            ok = tl == qlabel
            wrong += not ok
            row[c].imshow(_image(train_set, int(ti)))
            row[c].set_title(classes[tl] if classes else str(tl), fontsize=8, color="black" if ok else WRONG)
            for spine in row[c].spines.values():
                spine.set_edgecolor(RIGHT if ok else WRONG)
                spine.set_linewidth(2.5)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    total = len(chosen) * k
    fig.suptitle((title + "\n" if title else "") + f"{k} nearest training images (cosine); "
                 f"red = another class ({wrong}/{total} neighbours)", fontsize=9,
                 y=1 - 0.08 / fig.get_figheight(), va="top")
    return fig


def stratified(labels: Sequence[int], per_class: int, seed: int = 0) -> np.ndarray:
    """Up to ``per_class`` row indices of every class, drawn with ``seed``, sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = [rng.choice(idx, min(per_class, len(idx)), replace=False)
           for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(out))


def embedding_map(
    features: np.ndarray, labels: Sequence[int], classes: Sequence[str] | None = None, method: str = "pca",
    per_class: int = 200, seed: int = 0, title: str | None = None,
):
    """A 2-D map of features coloured by class: PCA, or t-SNE (``method="tsne"``), on a stratified subset."""
    if method not in ("pca", "tsne"):
        raise ConfigError(f"method must be 'pca' or 'tsne', got {method!r}")
    idx = stratified(labels, per_class, seed)
    x = np.asarray(features)[idx].astype(np.float64)
    y = np.asarray(labels)[idx]
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed)
        xy = pca.fit_transform(x)
        axis = [f"PC{i + 1} ({100 * v:.0f}% of variance)" for i, v in enumerate(pca.explained_variance_ratio_)]
    else:
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, max(2.0, (len(x) - 1) / 3)),
                  random_state=seed).fit_transform(x)
        axis = ["t-SNE 1", "t-SNE 2"]
    fig = _figure(6.5, 5.5)
    ax = fig.subplots()
    cmap = __import__("matplotlib").colormaps["tab10" if len(np.unique(y)) <= 10 else "tab20"]
    for j, c in enumerate(np.unique(y)):
        m = y == c
        name = display_name(classes[int(c)]) if classes is not None and int(c) < len(classes) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(j % cmap.N), label=name)
    ax.set_xlabel(axis[0])
    ax.set_ylabel(axis[1])
    if len(np.unique(y)) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best", ncol=2)
    ax.set_title((title + ": " if title else "") + f"{method.upper()} of {len(x)} images "
                 f"({per_class} per class at most)", fontsize=9)
    return fig


def read_metrics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``metrics.csv`` of a run as ``{key: (steps, values)}`` for every logged key (empty cells skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: a run writes metrics.csv once it has logged a step")
    series: dict[str, tuple[list, list]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step") or ""
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    series.setdefault(key, ([], []))
                    series[key][0].append(float(step) if step else float("nan"))
                    series[key][1].append(float(value))
                except ValueError:
                    continue
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in series.items() if v}


def training_curves(metrics_csv: str | Path, title: str | None = None):
    """Training curves from a run's ``metrics.csv``: losses, accuracies and validation metrics per step.

    One panel per group: ``train/*loss*``, ``train/*acc*`` (and other train scalars), ``val/*``;
    the learning rate is left out. Noisy per-step curves are drawn faint with a moving average on top.
    """
    series = read_metrics(metrics_csv)
    groups = {
        "training losses": [k for k in series if k.startswith("train/") and "loss" in k],
        "training accuracies": [k for k in series if k.startswith("train/") and "acc" in k],
        "validation": [k for k in series if k.startswith("val/")],
    }
    groups = {g: ks for g, ks in groups.items() if ks}
    if not groups:
        raise ConfigError(f"{metrics_csv}: no train/ or val/ metrics logged yet")
    fig = _figure(5.0 * len(groups), 3.6)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (group, keys) in zip(axes, groups.items(), strict=True):
        for key in sorted(keys):
            steps, values = series[key]
            line = ax.plot(steps, values, alpha=0.3 if len(values) > 20 else 1.0, lw=1)[0]
            if len(values) > 20:
                w = max(2, len(values) // 20)
                smooth = np.convolve(values, np.ones(w) / w, mode="valid")
                ax.plot(steps[w - 1 :], smooth, color=line.get_color(), lw=1.8, label=key)
            else:
                line.set_label(key)
                line.set_marker("o")
        ax.set_xlabel("optimiser step")
        ax.set_title(group, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
