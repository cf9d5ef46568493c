import numpy as np
import pytest
from matplotlib.image import imread
from rich.console import Console

from selfsup.errors import ConfigError
from selfsup.eval.label_efficiency import label_efficiency_sweep
from selfsup.eval.report import plot_sweep, print_sweep_table, read_json, write_json


@pytest.fixture(scope="module")
def sweep():
    rng = np.random.default_rng(0)
    ty, vy = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 10)
    centres = rng.normal(size=(3, 6)) * 2

    def feats(noise):
        return (
            (centres[ty] + noise * rng.normal(size=(60, 6))).astype(np.float32), ty,
            (centres[vy] + noise * rng.normal(size=(30, 6))).astype(np.float32), vy,
        )  # fmt: skip

    encoders = {"rotation": feats(1.0), "random_init": feats(4.0), "pixels": feats(6.0)}
    return label_efficiency_sweep(
        encoders, ks=(1, 2, 5, None), percents=(50,), seeds=(0, 1), dataset_key="toy"
    )


def test_plot_is_a_real_png(sweep, tmp_path):
    path = plot_sweep(sweep, tmp_path / "plots" / "curve.png")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0  # not a blank canvas
    with pytest.raises(ConfigError, match="top-5 of 3 classes"):  # 100 by construction: not drawn
        plot_sweep(sweep, tmp_path / "top5.png", metric="top5")


def test_table_lists_every_encoder_method_and_budget(sweep):
    console = Console(record=True, width=200)
    print_sweep_table(sweep, console=console)
    text = console.export_text()
    for word in ("rotation", "random_init", "pixels", "linear", "knn", "k=1", "50%", "all", "±"):
        assert word in text


def test_json_round_trip(sweep, tmp_path):
    path = write_json(sweep, tmp_path / "out" / "sweep.json")
    assert read_json(path) == sweep


def test_bad_metric_and_result(sweep, tmp_path):
    with pytest.raises(ConfigError, match="metric"):
        plot_sweep(sweep, tmp_path / "x.png", metric="top3")
    with pytest.raises(ConfigError, match="not a label-efficiency result"):
        print_sweep_table({"results": {}})


def test_floors_are_told_apart_and_percent_budgets_explained(sweep):
    from selfsup.eval.report import sweep_figure

    (ax,) = sweep_figure(sweep).axes
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles["random_init (linear)"] == "--" and styles["pixels (linear)"] == ":"
    assert styles["rotation (linear)"] == "-"
    # one floor's linear and kNN lines share a grey and a dash: their markers must differ
    markers = {line.get_label(): line.get_marker() for line in ax.get_lines()}
    for floor in ("random_init", "pixels"):
        assert markers[f"{floor} (linear)"] != markers[f"{floor} (knn)"]
    assert "percent budget" in ax.get_xlabel() and "50%" in [t.get_text() for t in ax.get_xticklabels()]


def test_sweep_table_fits_an_80_column_terminal(sweep):
    console = Console(record=True, width=80)
    tables = print_sweep_table(sweep, console=console)
    text = console.export_text()
    assert len(tables) > 1 and max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for word in ("k=1", "k=2", "k=5", "50%", "all", "random_init", "knn"):
        assert word in text


def test_a_folder_sweep_is_titled_by_its_folder_name(sweep):
    from selfsup.eval.report import dataset_label, sweep_figure

    assert dataset_label(sweep) == "toy"
    folder = dict(sweep, dataset="folder", provenance={"data": {"spec": "/home/me/photos/", "name": "folder"}})
    assert dataset_label(folder) == "folder 'photos'"  # not "folder", the subsets' key
    (ax,) = sweep_figure(folder).axes
    assert ax.get_title().startswith("Label efficiency on folder 'photos' (")
    console = Console(record=True, width=200)
    print_sweep_table(folder, console=console)
    assert "Label efficiency on folder 'photos'" in console.export_text()
