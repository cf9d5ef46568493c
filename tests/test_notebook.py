"""The notebooks run top to bottom, as a user would run them (nbclient, a fresh kernel), and are committed clean."""

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="install the dev extra: pip install -e '.[dev]'")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# What a notebook must never show: rich's or tqdm's complaints about missing widgets, Lightning's bare bar label.
NOISE = ("ipywidgets", "IProgress", "TqdmWarning", "Predicting")


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def execute(name: str, tmp_path: Path, monkeypatch, work: bool = True) -> tuple[str, list[dict]]:
    """Run a notebook in a fresh kernel (its WORK and selfsup's cache in ``tmp_path``); its text and outputs.

    With ``work=False`` the notebook makes its own temporary WORK folder, as for a user (under ``tmp_path/tmp``).
    """
    nbclient = pytest.importorskip("nbclient", reason="install the dev extra: pip install -e '.[dev]'")
    if work:
        monkeypatch.setenv("SELFSUP_WORK", str(tmp_path / "work"))
    else:
        monkeypatch.delenv("SELFSUP_WORK", raising=False)
        (tmp_path / "tmp").mkdir()
        monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SELFSUP_DATA", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = _listing(NOTEBOOKS)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, "\n".join(errors[0].get("traceback", []))[-3000:]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    text += "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs if "data" in o)
    assert not [word for word in NOISE if word in text], text[-3000:]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert _listing(NOTEBOOKS) == before, "a notebook wrote into notebooks/"
    assert not list(cwd.iterdir()), "a notebook wrote into its working directory instead of WORK"
    return text, outputs


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_have_their_outputs_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert re.match(r"\d\d_\w+\.ipynb$", path.name)  # numbered, in the order a user reads them


@pytest.mark.slow
def test_quickstart_notebook_removes_its_temporary_work_folder(tmp_path, monkeypatch):
    text, _ = execute("01_quickstart.ipynb", tmp_path, monkeypatch, work=False)
    top1 = float(re.search(r"linear probe top-1 (\d+\.\d)%", text).group(1))
    assert 50 < top1 <= 100  # ten digit classes: chance is 10%
    assert "extract rotation-convnet_small train (1,437 images)" in text
    work = Path(re.search(r"^(\S*selfsup-quickstart-\S+)$", text, re.M).group(1))
    assert work.parent == tmp_path / "tmp"  # it worked in a temporary folder of its own ...
    assert "notebook_sweep.png" in text and f"removed {work}" in text
    assert not work.exists()  # ... and removed it at the end


@pytest.mark.slow
def test_your_images_notebook(tmp_path, monkeypatch):
    text, outputs = execute("02_your_images.ipynb", tmp_path, monkeypatch)
    data = tmp_path / "work" / "my_images"
    assert sorted(p.name for p in (data / "train").iterdir()) == sorted(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    n_train, n_test = (int(v) for v in re.search(r"wrote (\d+) train and (\d+) test images", text).groups())
    assert n_train + n_test == 1797 and 300 < n_test < 420  # a fifth of the digits are test files
    assert "train: 10 classes: eight, five, four, nine, one, seven, six, three, two, zero" in text
    assert "extract rotation-convnet_small val (363 images)" in text
    assert "probe L2 search: chose weight_decay" in text
    pretrained, floor = (float(v) for v in re.search(
        r"linear probe top-1: (\d+\.\d)% pretrained, (\d+\.\d)% random-init floor", text).groups())
    assert 50 < pretrained <= 100 and 50 < floor <= 100
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # neighbours and the feature map
    run = tmp_path / "work" / "runs" / "rotation-convnet_small"
    assert (run / "export" / "config.json").is_file() and (run / "eval" / "neighbours.png").is_file()
    assert list((tmp_path / "cache").iterdir())  # the folder's decoded cache went where it was told


@pytest.mark.slow
def test_compare_methods_notebook(tmp_path, monkeypatch):
    text, outputs = execute("03_compare_methods.ipynb", tmp_path, monkeypatch)
    assert "removed" not in text  # a WORK the user chose is kept
    runs = tmp_path / "work" / "runs"
    for method in ("rotation", "relative_position"):
        row = re.search(rf"^{method} +(\d+\.\d)% +(\d+\.\d)% +(\d+\.\d)% +(\d+\.\d)%$", text, re.M)
        assert row, text[-2000:]
        assert all(0 < float(v) <= 100 for v in row.groups())
        assert (runs / f"{method}-convnet_small" / "eval" / "sweep.json").is_file()
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # label efficiency, two training curves
    page = (tmp_path / "work" / "report.html").read_text()
    assert "rotation-convnet_small" in page and "relative_position-convnet_small" in page
    assert "Label efficiency" in page and page.count("data:image/png;base64,") >= 5
