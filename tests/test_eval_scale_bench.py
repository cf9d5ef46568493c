"""The ImageNet-scale evaluation benchmark, at CI size: it runs, and its numbers are sane."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import eval_scale  # noqa: E402

pytestmark = pytest.mark.slow


def test_ci_preset_sweep_reports_time_memory_and_accuracy(tmp_path):
    out = tmp_path / "scale.json"
    assert eval_scale.main(["--preset", "ci", "--tasks", "sweep", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert "error" not in row, row
    assert row["task"] == "sweep" and row["n"] == 2000 and row["seconds"] > 0
    assert row["peak_rss_mib"] >= row["rss_after_imports_mib"] > 0
    budgets = row["budgets"]
    assert list(budgets) == ["1%", "10%", "all"]
    assert budgets["all"]["linear"] > budgets["1%"]["linear"] and budgets["all"]["linear"] > 70


def test_write_features_is_a_memory_map_with_balanced_labels(tmp_path):
    import numpy as np

    eval_scale.write_features(tmp_path / "x.npy", 100, 8, 5, "float16", seed=0)
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    y = np.load(tmp_path / "x.labels.npy")
    assert isinstance(x, np.memmap) and x.dtype == np.float16 and x.shape == (100, 8)
    assert np.bincount(y).tolist() == [20] * 5
