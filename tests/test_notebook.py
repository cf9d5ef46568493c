"""The notebook runs top to bottom, as a user would run it (nbclient, a fresh kernel)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="install the dev extra: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="install the dev extra: pip install -e '.[dev]'")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"

pytestmark = pytest.mark.slow


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "linear probe top-1" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (tmp_path / "runs").is_dir()
