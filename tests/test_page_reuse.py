"""`selfsup report` reuses saved results whose provenance matches, and draws accuracy per layer."""

import json

import pytest

from selfsup.eval import harness
from selfsup.eval.page import write_report
from selfsup.train import pretrain
from tests.conftest import run_cli_here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = {"model": {"backbone": "convnet_small"}, "data": {"data": "digits", "image_size": 8, "batch_size": 256},
           "trainer": {"max_epochs": 1, "max_steps": 2}, "output": str(out), "name": "tiny"}
    return pretrain(cfg).run_dir


def test_report_reuses_probe_json_with_matching_provenance_and_draws_layers(run_dir, tmp_path, monkeypatch):
    r = run_cli_here("probe", str(run_dir), "--no-baselines", cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr
    saved = json.loads((run_dir / "eval" / "probe.json").read_text())
    fits = []
    real = harness.evaluate

    def counting(ev, kind, **kw):
        fits.append((kind, ev.layers is not None))
        return real(ev, kind, **kw)

    monkeypatch.setattr(harness, "evaluate", counting)
    page = write_report([run_dir], tmp_path / "r.html", pictures=False)
    # probe.json was written without baselines, the report shows them: its encoders differ, so all are fitted
    assert ("probe", False) in fits
    r = run_cli_here("probe", str(run_dir), cwd=run_dir.parent)  # with baselines: what the report shows
    assert r.returncode == 0, r.stderr
    fits.clear()
    page = write_report([run_dir], tmp_path / "r.html", pictures=False)
    assert fits == [("knn", False)]  # the probe was reused, kNN (no knn_k20.json) fitted
    text = page.read_text()
    assert "probe results reused from" in text
    top1 = json.loads((run_dir / "eval" / "probe.json").read_text())["results"]["rotation (tiny)"]["top1"]
    assert f"{top1:.1f}" in text
    # settings that differ: no reuse
    data = json.loads((run_dir / "eval" / "probe.json").read_text())
    data["provenance"]["settings"]["linear_probe"]["tol"] = 1.0
    (run_dir / "eval" / "probe.json").write_text(json.dumps(data))
    fits.clear()
    write_report([run_dir], tmp_path / "r.html", pictures=False)
    assert ("probe", False) in fits
    assert saved["kind"] == "probe"

    fits.clear()
    page = write_report([run_dir], tmp_path / "layers.html", pictures=False, layers="2,out")
    assert ("probe", True) in fits and "linear probe per layer" in page.read_text()
