"""Reports of a label-efficiency sweep: a rich table, a matplotlib PNG curve, and the JSON file.

All three read the result dict of :func:`selfsup.eval.label_efficiency.label_efficiency_sweep` (its
schema is in that module's docstring). The plot follows CPC v2's label-efficiency figure: accuracy
against labelled images per class on a log axis, one line per encoder and method with a band of one
standard deviation over seeds, and the baselines (names starting with "random" or "pixels") dashed in
greys so the learned encoders stand out against the floor; a "supervised..." line is drawn in black.

- [0] CPC v2, 2019, https://arxiv.org/abs/1905.09272
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from selfsup.errors import ConfigError
from selfsup.names import display_name, displayable_figure

BASELINE_PREFIXES = ("random", "pixels")
_METRICS = ("top1", "top5")
_METHOD_STYLE = {"linear": ("-", "o"), "knn": ("-.", "s"), "finetune": (":", "^")}
_BASELINE_GREYS = ("0.25", "0.5", "0.65", "0.4", "0.75")


def make_console() -> Console:
    """A rich console; when output is not a terminal (a log, a pipe) it is 160 columns, not rich's 80,
    so that sweep tables are not cut to ellipses."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def is_baseline(name: str) -> bool:
    """Whether an encoder name denotes a baseline (random-init encoder or raw pixels)."""
    return name.lower().startswith(BASELINE_PREFIXES)


def _check(result: Mapping[str, Any], metric: str) -> None:
    if metric not in _METRICS:
        raise ConfigError(f"metric must be one of {_METRICS}, got {metric!r}")
    missing = [key for key in ("budgets", "results") if key not in result]
    if missing:
        raise ConfigError(f"not a label-efficiency result: missing {missing}")
    if metric == "top5" and int(result.get("num_classes") or 6) <= 5:
        raise ConfigError(f"top-5 of {result['num_classes']} classes is 100 by construction: use top1")


def dataset_label(result: Mapping[str, Any]) -> str | None:
    """What a sweep's title calls its data: the dataset's name, or for an image folder its folder name.

    ``result["dataset"]`` is the location-free key that seeds the subsets ("folder" for every image
    folder), so a folder is named from the provenance's data spec: ``folder 'photos'``.
    """
    name = result.get("dataset")
    spec = ((result.get("provenance") or {}).get("data") or {}).get("spec")
    if name == "folder" and spec:
        return f"folder {display_name(Path(str(spec).rstrip('/')).name)!r}"
    return name


def print_sweep_table(
    result: Mapping[str, Any], console: Console | None = None, metric: str = "top1"
) -> list[Table]:
    """Print the sweep: a row per encoder and method, a column per budget, cells "mean ± std" in percent.

    The best mean of each column among the rows of one method is bold. When the budgets do not fit the
    console's width (an 80-column terminal), they are split over several tables, each repeating the
    encoder and method columns, rather than cut to unreadable cells.

    Args:
        result: a :func:`~selfsup.eval.label_efficiency.label_efficiency_sweep` result.
        console: where to print; a new :class:`rich.console.Console` when None.
        metric: "top1" or "top5".

    Returns:
        The printed :class:`rich.table.Table` (one or more).
    """
    _check(result, metric)
    console = console or make_console()
    budgets = result["budgets"]
    seeds = result.get("seeds", [])
    dataset = dataset_label(result)
    title = f"Label efficiency{' on ' + dataset if dataset else ''}: {metric} (%)"
    best: dict[tuple[str, str], float] = {}
    for methods in result["results"].values():
        for method, entries in methods.items():
            for e in entries:
                key = (method, e["budget"])
                best[key] = max(best.get(key, -np.inf), e[f"{metric}_mean"])
    names = [n for n in result["results"]] or [""]
    fixed = max(len("encoder"), *(len(n) for n in names)) + max(len("method"), 8) + 7  # two columns, borders
    per_table = max(1, (console.width - fixed) // 15)  # "100.0 ± 10.0" plus padding
    tables = []
    for start in range(0, len(budgets), per_table):
        part = budgets[start : start + per_table]
        last = start + per_table >= len(budgets)
        table = Table(title=title if start == 0 else None,
                      caption=f"mean ± std over {len(seeds)} seed(s); (n) = labelled images" if last else None)
        table.add_column("encoder", style="bold", overflow="fold")
        table.add_column("method", no_wrap=True)
        for b in part:
            table.add_column(f"{b['name']}\n({b['n_labels']})", justify="right", no_wrap=True)
        for name, methods in result["results"].items():
            for method, entries in methods.items():
                by_budget = {e["budget"]: e for e in entries}
                cells = []
                for b in part:
                    e = by_budget.get(b["name"])
                    if e is None:
                        cells.append("-")
                        continue
                    mean, std = e[f"{metric}_mean"], e[f"{metric}_std"]
                    cell = f"{mean:.1f} ± {std:.1f}"
                    cells.append(f"[bold]{cell}[/bold]" if mean >= best[(method, b["name"])] else cell)
                table.add_row(name if not is_baseline(name) else f"[dim]{name}[/dim]", method, *cells)
        console.print(table)
        tables.append(table)
    return tables


def _x_positions(result: Mapping[str, Any]) -> dict[str, float]:
    """x (labelled images per class) of each budget; "all" sits at the mean per-class count."""
    mean_per_class = result.get("mean_labels_per_class")
    xs = {}
    for b in result["budgets"]:
        x = b["labels_per_class"]
        if b["name"] == "all" and mean_per_class:
            x = mean_per_class
        xs[b["name"]] = float(x)
    return xs


def plot_sweep(result: Mapping[str, Any], path: str | Path, metric: str = "top1") -> Path:
    """Write :func:`sweep_figure` as a PNG (parent folders are created); return its path."""
    path = Path(path)
    fig = sweep_figure(result, metric)
    path.parent.mkdir(parents=True, exist_ok=True)
    displayable_figure(fig).savefig(path, dpi=120)
    return path


def sweep_figure(result: Mapping[str, Any], metric: str = "top1"):
    """Accuracy against labelled images per class (log x) as a matplotlib Figure.

    One line per encoder and method, with a ±1 std band over seeds (``fill_between``); baselines
    (names starting with "random" or "pixels") are greys, random init dashed and pixels dotted, with
    the method's marker hollow (linear o, kNN s), so a floor's linear and kNN lines are told apart.
    The "all labels" point sits at the mean number of labels per class and its tick reads "all";
    percent budgets read "10%", subset files their budget name.

    Args:
        result: a :func:`~selfsup.eval.label_efficiency.label_efficiency_sweep` result.
        metric: "top1" or "top5".

    Returns:
        The Figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, NullLocator

    _check(result, metric)
    xs = _x_positions(result)
    # pyplot-free figure: no global backend switch, safe in threads and on headless machines
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n_learned = n_base = 0
    for name, methods in result["results"].items():
        baseline = is_baseline(name)
        floor_style = "--" if name.lower().startswith("random") else ":"  # random init dashed, pixels dotted
        if baseline:
            color, n_base = _BASELINE_GREYS[n_base % len(_BASELINE_GREYS)], n_base + 1
        elif name.lower().startswith("supervised"):
            color = "black"  # the supervised reference (a ceiling rather than a floor)
        else:
            color, n_learned = f"C{n_learned % 10}", n_learned + 1
        for method, entries in methods.items():
            pts = sorted((xs[e["budget"]], e[f"{metric}_mean"], e[f"{metric}_std"]) for e in entries)
            if not pts:
                continue
            x, mean, std = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
            style, marker = _METHOD_STYLE.get(method, ("-", "o"))
            # a floor's linear and kNN lines share its grey and dash: the method's marker, hollow, tells them apart
            ax.plot(
                x, mean, linestyle=floor_style if baseline else style, marker=marker, markersize=5 if baseline else 4,
                markerfacecolor="none" if baseline else color, color=color, label=display_name(f"{name} ({method})"),
                linewidth=1.4 if baseline else 1.8,
            )  # fmt: skip
            ax.fill_between(
                x, mean - std, mean + std, color=color, alpha=0.06 if baseline else 0.2, linewidth=0
            )
    ticks: dict[float, list[str]] = {}
    for b in result["budgets"]:
        if b["k"] is not None:
            label = str(b["k"])
        elif b["percent"] is not None and b["name"] != "all":
            label = f"{b['percent']:g}%"
        else:  # "all", or a subset file ("file:1percent.txt")
            label = b["name"]
        ticks.setdefault(xs[b["name"]], []).append(display_name(label))  # a subset file named in bytes
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(list(ticks), ["/".join(v) for v in ticks.values()])
    has_percent = any(b["k"] is None and b["percent"] is not None and b["name"] != "all" for b in result["budgets"])
    ax.set_xlabel("labelled images per class (log scale)" + (
        "; a percent budget sits at its mean count per class" if has_percent else ""))
    ax.set_ylabel(f"{'top-1' if metric == 'top1' else 'top-5'} accuracy (%)")
    dataset = dataset_label(result) or "features"
    n_seeds = len(result.get("seeds", [])) or 1
    ax.set_title(
        f"Label efficiency on {dataset} (mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''})"
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return fig


def _to_json(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write a result dict as indented JSON (numpy/torch values converted); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_to_json, allow_nan=False) + "\n")
    return path


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a result written by :func:`write_json`."""
    return json.loads(Path(path).read_text())
