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
