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
    assert eval_scale.main(["--preset", "ci", "--tasks", "sweep", "--threads", "1", "--resident-mib", "0",
                            "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert "error" not in row, row
    assert row["resident_budget_mib"] == 0  # --resident-mib reaches the worker: every fit streamed
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


def test_evals_task_times_streamed_and_resident_evaluations(tmp_path):
    out = tmp_path / "evals.json"
    assert eval_scale.main(["--preset", "ci", "--tasks", "evals", "--threads", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    assert len(row["streamed_s"]) == len(row["resident_s"]) == 3
    assert min(row["streamed_s"]) > 0 and min(row["resident_s"]) > 0 and row["streamed_over_resident"] > 0
