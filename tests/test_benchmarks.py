"""The benchmark scripts run end to end on CI-sized presets, so they cannot rot."""

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import speed

    return speed


def test_speed_ci_preset_times_every_method_against_its_floor(bench, tmp_path):
    out = tmp_path / "speed.json"
    assert bench.main(["--preset", "ci", "--methods", "rotation", "--no-data", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["methods"]
    assert row["method"] == "rotation" and row["step_s"] > 0 and row["floor_s"] > 0
    # the ratio is taken per interleaved round, then the median (timings themselves are not asserted)
    assert row["overhead"] == statistics.median(row["overhead_per_round"])
    assert row["images_per_s"] == pytest.approx(row["batch"] / row["step_s"])
    assert result["machine"]["loadavg"] and "speed.py --preset ci" in result["command"]


def test_speed_rejects_unknown_method(bench, capsys):
    assert bench.main(["--preset", "ci", "--methods", "rotatoin", "--no-data"]) == 2
    assert "unknown methods ['rotatoin']" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_quality_cpu_smoke_writes_table_and_resumes(bench, tmp_path, capsys):
    import quality

    work, out = tmp_path / "work", tmp_path / "q"
    args = ["--preset", "cpu-smoke", "--methods", "rotation", "--work", str(work), "--out", str(out)]
    assert quality.main(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    (res,) = result["results"]
    assert res["method"] == "rotation" and res["pretrain_steps"] == 2 and res["pretrain_seconds"] > 0
    rows = res["rows"]
    assert set(rows) == {"method", "random init", "pixels"}
    for row in rows.values():  # every encoder scored by every probe and budget
        assert 0 <= row["knn200_t007_top1"] <= 100 and set(row["label_efficiency"]) == {"k=1", "k=10", "all"}
    assert rows["method"]["label_efficiency"]["all"]["mean"] == pytest.approx(rows["method"]["linear_top1"])
    assert list(result["supervised"]) == ["convnet_small|digits"]
    table = out.with_suffix(".md").read_text()
    assert "| rotation |" in table and "supervised from scratch" in table and "quality.py --preset cpu-smoke" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # a rerun resumes: nothing is pretrained or evaluated again
    capsys.readouterr()
    assert quality.main(args) == 0
    assert "rotation: done earlier" in capsys.readouterr().out
