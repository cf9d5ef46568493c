"""``selfsup report``: one self-contained HTML page telling the story of one or several runs.

For each run: its config, the linear-probe and kNN table beside the random-init floor and raw pixels,
training curves, a nearest-neighbour retrieval grid, a 2-D embedding map and, where the run wrote them,
generator samples or colorization results. Above them, the label-efficiency curves of every run (from
each run's ``eval/sweep.json``) on one plot. Every image is embedded as a PNG data URI: the page needs
no network and opens from disk.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from selfsup.errors import ConfigError
from selfsup.eval import viz
from selfsup.eval.report import is_baseline
from selfsup.names import display_name, displayable_figure

SAMPLE_FOLDERS = ("samples", "colorization", "reconstructions")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.floor td{color:#777}
.note{color:#555;font-size:.9em}img{max-width:100%;border:1px solid #eee;margin:.3em 0}
pre{background:#f7f7f7;padding:.7em;overflow:auto;font-size:.85em}.grid{display:flex;flex-wrap:wrap;gap:1em}
.grid>div{flex:1 1 480px}.grid>div.wide{flex-basis:100%}.good{color:#2c7a2c;font-weight:600}.bad{color:#b02a2a;font-weight:600}
"""

# pictures of several panels side by side: a row of their own, else their labels shrink to ~5 px (the
# neighbour grid's nine columns of thumbnails too: at half width a 32 px image was drawn about 50 px wide)
WIDE_IMAGES = {"training curves", "nearest neighbours"}

@dataclass
class RunSummary:
    """What the page shows of one run."""

    name: str
    path: Path
    config_text: str
    rows: dict[str, dict] = field(default_factory=dict)  # encoder -> {"linear": top1, "knn": top1, ...}
    sweep: dict | None = None
    images: dict[str, str] = field(default_factory=dict)  # title -> data URI
    notes: list[str] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)  # encoder -> {"layers": {layer: top1}, "best": layer}


def png_data_uri(fig_or_path) -> str:
    """A ``data:image/png;base64,...`` URI of a matplotlib figure or a PNG file."""
    if isinstance(fig_or_path, (str, Path)):
        data = Path(fig_or_path).read_bytes()
    else:
        buf = io.BytesIO()
        displayable_figure(fig_or_path).savefig(buf, format="png", dpi=fig_or_path.dpi, bbox_inches="tight")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _run_dir(path: str | Path) -> Path:
    from selfsup.runs import finished_run_dir

    return finished_run_dir(path)


def summarise(path: str | Path, data: str | None = None, pictures: bool = True, progress: bool = False,
              layers: str | None = None) -> RunSummary:
    """Evaluate (from the cache where possible) and draw one run; ``layers`` adds accuracy per layer.

    A probe or kNN result the run already saved (``eval/probe.json``, ``knn_k20.json``,
    ``probe_layers.json``) is reused when its provenance matches (:func:`~selfsup.eval.harness.saved_results`).
    """
    from selfsup.eval import harness

    run = _run_dir(path)
    cfg = run / "config.yaml"
    summary = RunSummary(run.name, run, cfg.read_text() if cfg.is_file() else (run / "export" / "config.json").read_text())
    src = harness.resolve_source(str(run))
    ev = harness.prepare(src, data=data, progress=progress)
    results = harness.results_dir_for(src, ev)

    def rows_of(ev, kind: str, settings: dict, layers: str | None = None, **kw) -> dict:
        """The saved result when its provenance matches (no fit repeated), else a fresh evaluation."""
        path = results / harness.result_name(kind, **kw, layers=layers)
        saved = harness.saved_results(path, ev, kind, settings)
        if saved is not None:
            summary.notes.append(f"{kind} results reused from {path} (same data, settings and features)")
            return saved
        return harness.evaluate(ev, kind, progress=progress, **kw)

    probe = rows_of(ev, "probe", {"linear_probe": harness.probe_settings()})
    knn = rows_of(ev, "knn", {"k": 20, "temperature": None}, k=20, temperature=None)
    for name in ev.features:
        summary.rows[name] = {"linear": probe[name]["top1"], "linear5": probe[name]["top5"],
                              "knn": knn[name]["top1"], "dim": probe[name]["features"]}
    if layers is not None:
        lev = harness.prepare(src, data=data, progress=progress, layers=layers, dtype="float16")
        by_layer = rows_of(lev, "probe", {"linear_probe": harness.probe_settings()}, layers=layers)
        for name, row in by_layer.items():
            summary.layers[name] = {"layers": {k: v["top1"] for k, v in row["layers"].items()},
                                    "best": row["best_layer"]}
        summary.images["linear probe per layer"] = png_data_uri(layer_figure(summary))
    sweep = run / "eval" / "sweep.json"
    if sweep.is_file():
        summary.sweep = json.loads(sweep.read_text())
    else:
        summary.notes.append(f"no label-efficiency sweep yet: `selfsup sweep {run}` adds its curve")
    metrics = run / "metrics.csv"
    if metrics.is_file():
        try:
            summary.images["training curves"] = png_data_uri(viz.training_curves(metrics, title=run.name))
        except ConfigError as e:
            summary.notes.append(str(e))
    if pictures:
        train, test = ev.features[src.name]
        summary.images["nearest neighbours"] = png_data_uri(
            viz.retrieval_grid(ev.train, ev.test, train.x, test.x, queries=6, k=8, title=src.name))
        summary.images["embedding map"] = png_data_uri(
            viz.embedding_map(test.x, test.y, ev.test.classes, per_class=100, title=f"{src.name}, test split"))
    for folder in SAMPLE_FOLDERS:
        pngs = sorted((run / folder).glob("*.png")) if (run / folder).is_dir() else []
        if pngs:
            summary.images[f"{folder} ({pngs[-1].name})"] = png_data_uri(pngs[-1])
    return summary


def layer_figure(run: RunSummary):
    """Linear-probe top-1 per layer (shallow to deep) of a run's encoder (solid) and its random-init floor
    (dashed); each line's best layer (on held-out training labels) circled."""
    fig = viz._figure(7, 4)
    ax = fig.subplots()
    order: list[str] = []
    for entry in run.layers.values():
        order += [n for n in entry["layers"] if n not in order]
    for name, entry in run.layers.items():
        xs = [order.index(n) for n in entry["layers"]]
        ys = list(entry["layers"].values())
        style = "--" if name.startswith("random") else ":" if is_baseline(name) else "-"
        (line,) = ax.plot(xs, ys, style, marker="o", label=name)
        best = entry["best"]
        ax.plot([order.index(best)], [entry["layers"][best]], "o", ms=13, mfc="none", color=line.get_color())
    ax.set_xticks(range(len(order)), order, rotation=30, fontsize=8)
    ax.set_xlabel("layer (shallow to deep; out = the encoder's features)")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.set_title(f"{run.name}: accuracy per layer (circled: best on held-out training labels)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def label_efficiency_figure(runs: list[RunSummary]):
    """Linear-probe top-1 against labels per class for every run's sweep, on one plot.

    Each run is one colour: its encoder solid with error bars, its own random-init floor dashed (runs
    of different architectures have different floors); raw pixels dotted grey, drawn once per distinct
    curve.
    """
    with_sweep = [r for r in runs if r.sweep]
    if not with_sweep:
        return None
    from matplotlib.ticker import NullLocator

    fig = viz._figure(8, 4.8)
    ax = fig.subplots()
    colours = __import__("matplotlib").colormaps["tab10"]
    drawn_pixels: set[tuple] = set()
    ticks: dict[float, str] = {}
    for i, run in enumerate(with_sweep):
        res = run.sweep
        for enc, methods in res["results"].items():
            entries = methods.get("linear")
            if not entries:
                continue
            x = [e["n_labels"] / res["num_classes"] for e in entries]
            y = [e["top1_mean"] for e in entries]
            for xi, e in zip(x, entries, strict=True):  # ticks read 1, 2, 5, ..., all as in sweep.png
                ticks.setdefault(round(xi, 6), str(e["k"]) if e.get("k") is not None else str(e.get("budget", "")))
            if enc.startswith("random"):  # each run's own floor (its architecture), dashed in the run's colour
                ax.plot(x, y, "--", color=colours(i % 10), alpha=0.8, lw=1.2, label=f"{run.name}: random init")
            elif is_baseline(enc):  # raw pixels: one line per distinct curve (the same data gives the same)
                if (enc, tuple(x), tuple(y)) in drawn_pixels:
                    continue
                drawn_pixels.add((enc, tuple(x), tuple(y)))
                ax.plot(x, y, ":", color="0.25", label=enc if len(drawn_pixels) == 1 else f"{enc} ({run.name})")
            else:
                s = [e["top1_std"] for e in entries]
                ax.errorbar(x, y, yerr=s, marker="o", capsize=2, color=colours(i % 10), label=run.name)
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.set_xlabel("labelled images per class (log scale)")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.set_title("label efficiency: each run solid, its random-init floor dashed in its colour, raw pixels dotted",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def cell(row: dict | None, key: str) -> str:
    return "-" if row is None or row.get(key) is None else f"{row[key]:.1f}"


def _table(run: RunSummary) -> str:
    method_rows = {k: v for k, v in run.rows.items() if not is_baseline(k)}
    floor = next((v for k, v in run.rows.items() if k.startswith("random")), None)
    top5 = any(r.get("linear5") is not None for r in run.rows.values())  # None: 5 classes or fewer
    out = ["<table><tr><th>encoder</th><th>linear top-1 %</th>" + ("<th>linear top-5 %</th>" if top5 else "")
           + "<th>kNN (k=20) top-1 %</th><th>features</th></tr>"]
    for name, r in run.rows.items():
        cls = ' class="floor"' if is_baseline(name) else ""
        mark = ""
        if name in method_rows and floor is not None:
            diff = r["linear"] - floor["linear"]
            mark = f' <span class="{"good" if diff > 0 else "bad"}">({diff:+.1f} vs floor)</span>'
        five = f"<td>{cell(r, 'linear5')}</td>" if top5 else ""
        out.append(f"<tr{cls}><td>{html.escape(name)}</td><td>{r['linear']:.1f}{mark}</td>{five}"
                   f"<td>{r['knn']:.1f}</td><td>{r['dim']}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def render(runs: list[RunSummary], title: str = "selfsup report") -> str:
    """The whole page as one HTML string."""
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">{len(runs)} run(s), generated {datetime.datetime.now():%Y-%m-%d %H:%M} by '
             "<code>selfsup report</code>. Floors: a randomly initialised encoder of the same architecture "
             "and raw pixels, scored by the same probes on the same data.</p>"]
    parts.append("<h2>Overview</h2>")
    parts.append("<table><tr><th>run</th><th>linear top-1 %</th><th>floor (random init)</th><th>pixels</th>"
                 "<th>kNN top-1 %</th></tr>")
    for r in runs:
        main = next((v for k, v in r.rows.items() if not is_baseline(k)), None)
        floor = next((v for k, v in r.rows.items() if k.startswith("random")), None)
        pixels = r.rows.get("pixels")
        parts.append(f"<tr><td><a href=\"#{html.escape(r.name)}\">{html.escape(r.name)}</a></td><td>{cell(main, 'linear')}</td>"
                     f"<td>{cell(floor, 'linear')}</td><td>{cell(pixels, 'linear')}</td><td>{cell(main, 'knn')}</td></tr>")
    parts.append("</table>")
    fig = label_efficiency_figure(runs)
    if fig is not None:
        parts.append("<h2>Label efficiency</h2>")
        parts.append(f'<img alt="label efficiency of every run" src="{png_data_uri(fig)}">')
    for r in runs:
        parts.append(f'<h2 id="{html.escape(r.name)}">{html.escape(r.name)}</h2>')
        parts.append(f'<p class="note">{html.escape(str(r.path))}</p>')
        parts.append(_table(r))
        for note in r.notes:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        parts.append('<div class="grid">')
        for name, uri in r.images.items():
            wide = ' class="wide"' if name in WIDE_IMAGES else ""
            parts.append(f'<div{wide}><h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" src="{uri}"></div>')
        parts.append("</div>")
        parts.append(f"<details><summary>config</summary><pre>{html.escape(r.config_text)}</pre></details>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_report(runs: list[str | Path], output: str | Path, data: str | None = None, pictures: bool = True,
                 progress: bool = False, layers: str | None = None) -> Path:
    """Summarise every run and write the page to ``output`` (atomically); the path."""
    if not runs:
        raise ConfigError("give at least one run directory")
    summaries = [summarise(r, data=data, pictures=pictures, progress=progress, layers=layers) for r in runs]
    names = [s.name for s in summaries]
    for i, s in enumerate(summaries):  # two runs named alike (from two output folders) stay apart
        if names.count(s.name) > 1:
            s.name = f"{s.name} ({s.path.parent.name})" if s.path.parent.name else f"{s.name} #{i}"
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    from selfsup.checkpoint import atomic_write, disk_full, no_space_error

    page = render(summaries, title="selfsup report: " + ", ".join(s.name for s in summaries))
    page = display_name(page).encode()  # a path that is not UTF-8 is shown with U+FFFD
    try:
        with atomic_write(output) as f:  # its temporary file goes on any failure
            f.write(page)
    except OSError as err:
        if disk_full(err, output, len(page)):
            raise no_space_error(output, len(page)) from None
        raise
    return output


__all__ = ["RunSummary", "label_efficiency_figure", "layer_figure", "png_data_uri", "render", "summarise", "write_report"]
