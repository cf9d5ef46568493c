"""Pictures (selfsup.eval.viz) and the HTML report page, as a user makes them."""

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from selfsup.errors import ConfigError
from selfsup.eval import viz
from selfsup.train import pretrain
from tests.conftest import run_cli


class _Labels:
    def __init__(self, labels, classes, size=8):
        self.labels = np.asarray(labels)
        self.classes = classes
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)


def test_nearest_neighbours_stream_over_chunks_like_brute_force():
    g = torch.Generator().manual_seed(0)
    train, query = torch.randn(103, 7, generator=g), torch.randn(9, 7, generator=g)
    got = viz.nearest_neighbours(train.numpy(), query.numpy(), k=5, chunk=10)  # 11 chunks, merged heaps
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    np.testing.assert_array_equal(got, sims.topk(5, dim=1).indices.numpy())
    with pytest.raises(ConfigError, match="k must be in"):
        viz.nearest_neighbours(train.numpy(), query.numpy(), k=0)


def test_retrieval_grid_frames_wrong_class_neighbours_red():
    # two classes on two rays; one class-1 training row sits on class 0's ray (a wrong neighbour)
    train_x = np.array([[1, 0], [1, 0.01], [1, 0.02], [0, 1], [0.01, 1], [1, 0.005]], dtype=np.float32)
    train = _Labels([0, 0, 0, 1, 1, 1], ["a", "b"])
    test = _Labels([0, 1], ["a", "b"])
    test_x = np.array([[1, 0.001], [0, 1]], dtype=np.float32)
    fig = viz.retrieval_grid(train, test, train_x, test_x, queries=2, k=3)
    reds = [ax for ax in fig.axes if ax.spines["top"].get_edgecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=0.01)]
    # query "a" gets rows 0, 5 (wrong), 1; query "b" gets 3, 4 and one of class a (wrong)
    assert len(reds) == 2
    assert "(2/6 neighbours)" in fig._suptitle.get_text()
    # the grid starts right under the title: no blank band (matplotlib's default top left an inch),
    # and no label under the title either
    rng = np.random.default_rng(0)
    tall = viz.retrieval_grid(_Labels(np.arange(20) % 4, list("abcd")), _Labels(np.arange(8) % 4, list("abcd")),
                              rng.normal(size=(20, 3)), rng.normal(size=(8, 3)), queries=8, k=3)
    top_of_grid = max(ax.get_position().y1 for ax in tall.axes)
    assert (1 - top_of_grid) * tall.get_figheight() < 1.0  # inches between the figure's top and the grid
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    title_box = fig._suptitle.get_window_extent(renderer)
    assert title_box.y0 > max(ax.title.get_window_extent(renderer).y1 for ax in fig.axes)


def test_embedding_map_pca_and_tsne_on_a_stratified_subset():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [50, 10, 40])
    feats = rng.normal(size=(100, 6)) + labels[:, None] * 3
    idx = viz.stratified(labels, per_class=20)
    assert np.bincount(labels[idx]).tolist() == [20, 10, 20]
    for method in ("pca", "tsne"):
        fig = viz.embedding_map(feats, labels, ["x", "y", "z"], method=method, per_class=20)
        (ax,) = fig.axes
        assert sum(len(c.get_offsets()) for c in ax.collections) == 50
    with pytest.raises(ConfigError, match="'pca' or 'tsne'"):
        viz.embedding_map(feats, labels, method="umap")


def test_training_curves_from_metrics_csv(tmp_path):
    csv = tmp_path / "metrics.csv"
    rows = ["epoch,step,train/loss,train/rotation_acc,val/online_top1,lr-SGD"]
    rows += [f"0,{s},{1 / (s + 1)},{s / 50},,0.1" for s in range(40)] + ["0,39,,,55.0,"]
    csv.write_text("\n".join(rows) + "\n")
    series = viz.read_metrics(csv)
    assert len(series["train/loss"][1]) == 40 and series["val/online_top1"][1].tolist() == [55.0]
    fig = viz.training_curves(csv)
    assert [ax.get_title() for ax in fig.axes] == ["training losses", "training accuracies", "validation"]
    with pytest.raises(ConfigError, match="not found"):
        viz.training_curves(tmp_path / "missing.csv")


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


@pytest.mark.slow
def test_report_page_is_well_formed_and_every_image_decodes(tmp_path):
    from PIL import Image

    runs = []
    for method in ("rotation", "cpc"):
        cfg = {"method": method, "model": {"backbone": "convnet_small"},
               "data": {"data": "digits", "image_size": 16, "batch_size": 64},
               "trainer": {"max_steps": 3, "log_every_n_steps": 1}, "output": str(tmp_path), "name": method}
        runs.append(str(pretrain(cfg).run_dir))
    out = tmp_path / "page" / "report.html"
    proc = run_cli("report", *runs, "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    checker = _Checker()
    checker.feed(page)
    assert checker.errors == [] and checker.stack == []
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page
    assert len(checker.images) >= 2 * 3  # curves, retrieval and embedding map of each run
    for src in checker.images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    for name in ("rotation", "cpc", "random init (same architecture)", "pixels", "training curves"):
        assert name in page
    assert re.search(r"vs floor\)", page)
    proc = run_cli("plot", runs[0], "retrieval", "-o", str(tmp_path / "r.png"), "--k", "4", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG", proc.stderr
    proc = run_cli("plot", str(tmp_path), "curves", cwd=tmp_path)
    assert proc.returncode == 2 and f"{tmp_path} is a folder of runs (cpc, rotation): pass one of them" in proc.stderr


def test_report_label_efficiency_draws_every_runs_own_floor_in_its_colour(tmp_path):
    from matplotlib.colors import to_hex

    from selfsup.eval.page import RunSummary, label_efficiency_figure

    def sweep(floor_shift):
        def entries(acc):
            return [{"n_labels": n, "k": k, "budget": b, "top1_mean": acc + n / 10, "top1_std": 1.0}
                    for n, k, b in ((10, 1, "k=1"), (50, 5, "k=5"), (400, None, "all"))]

        return {"num_classes": 10, "results": {
            "rotation (r)": {"linear": entries(30)},
            "random init (same architecture)": {"linear": entries(20 + floor_shift)},
            "pixels": {"linear": entries(15)},
        }}  # fmt: skip

    runs = [RunSummary("rot", tmp_path, "", sweep=sweep(0)), RunSummary("cpc", tmp_path, "", sweep=sweep(2))]
    (ax,) = label_efficiency_figure(runs).axes
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    floors = [lines["rot: random init"], lines["cpc: random init"]]  # both runs' floors, not the first only
    assert [f.get_linestyle() for f in floors] == ["--", "--"]
    assert to_hex(floors[0].get_color()) != to_hex(floors[1].get_color())
    assert [label for label in lines if "pixels" in label] == ["pixels"]  # the same pixels curve once
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "5", "all"]  # not 10^0, 10^1


def test_report_gives_the_training_curves_and_the_neighbour_grid_a_row_of_their_own(tmp_path):
    from selfsup.eval.page import RunSummary, render

    uri = "data:image/png;base64,iVBORw0KGgo="
    run = RunSummary("rot", tmp_path, "", images={"training curves": uri, "nearest neighbours": uri,
                                                  "embedding map": uri})
    page = render([run])
    assert '<div class="wide"><h3>training curves</h3>' in page  # three panels at half width were unreadable
    assert '<div class="wide"><h3>nearest neighbours</h3>' in page  # nine thumbnails a row, likewise
    assert "<div><h3>embedding map</h3>" in page  # one panel: half width reads fine
    assert re.search(r"\.grid>div\.wide\{flex-basis:100%\}", page)
