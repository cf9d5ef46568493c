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


@pytest.mark.slow
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


@pytest.mark.slow
def test_quality_cpu_smoke_writes_table_and_resumes(bench, tmp_path, capsys):
    import quality

    work, out = tmp_path / "work", tmp_path / "q"
    args = ["--preset", "cpu-smoke", "--methods", "rotation", "--variant", "rotation:head_hidden=16", "--work",
            str(work), "--out", str(out)]
    assert quality.main(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    res, variant = result["results"]
    # a variant is its own run and row, with its option; the baselines are scored once and shared
    assert variant["method"] == "rotation (head_hidden=16)" and variant["hparams"]["head_hidden"] == 16
    assert (work / "runs" / "rotation-head_hidden-16" / "export").is_dir()
    for role in ("random init", "pixels"):
        assert variant["rows"][role] == res["rows"][role]
    # the floor's and the pixels' scores, and the floor's per-layer probes: memoised once for both rows
    assert len(json.loads((work / "results" / "_baselines.json").read_text())) == 3
    assert res["method"] == "rotation" and res["pretrain_steps"] == 2 and res["pretrain_seconds"] > 0
    rows = res["rows"]
    assert set(rows) == {"method", "random init", "pixels"}
    for row in rows.values():  # every encoder scored by every probe and budget
        assert 0 <= row["knn200_t007_top1"] <= 100 and set(row["label_efficiency"]) == {"k=1", "k=10", "all"}
    assert rows["method"]["label_efficiency"]["all"]["mean"] == pytest.approx(rows["method"]["linear_top1"])
    # every stage probed, for the method and its floor at the same layers; "out" is the last-layer probe
    m, f = rows["method"], rows["random init"]
    assert len(m["layers"]) > 1 and set(m["layers"]) == set(f["layers"]) and "out" in m["layers"]
    assert m["layers"]["out"]["top1"] == pytest.approx(m["linear_top1"])
    for row in (m, f):
        assert row["best_layer_top1"] == row["layers"][row["best_layer"]]["top1"]
        vals = {layer: r["val_top1"] for layer, r in row["layers"].items()}
        assert vals[row["best_layer"]] == max(vals.values())  # chosen on held-out training labels
    assert "layers" not in rows["pixels"]
    assert list(result["supervised"]) == ["convnet_small|digits"]
    table = out.with_suffix(".md").read_text()
    assert "| rotation |" in table and "supervised from scratch" in table and "quality.py --preset cpu-smoke" in table
    assert "best layer top-1" in table and f"({m['best_layer']})" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # a rerun resumes: nothing is pretrained or evaluated again
    capsys.readouterr()
    assert quality.main(args) == 0
    printed = capsys.readouterr().out
    assert "rotation: done earlier" in printed and "rotation (head_hidden=16): done earlier" in printed


@pytest.mark.parametrize("text", ["cpc", "cpc:", "cpc:directions", "cpc:=down"])
def test_quality_variant_needs_options(bench, text, capsys):
    import quality

    assert quality.main(["--preset", "cpu-smoke", "--variant", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quality.py: error: --variant") and ("KEY=VALUE" in err) and err.count("\n") == 1


def test_quality_image_budget_counts_batches_not_optimiser_steps(bench, tmp_path):
    """A GAN takes two optimiser steps a batch: the same image budget gives it twice the max_steps."""
    import quality

    preset = dict(quality.PRESETS["cpu"], method_images={"relative_position": 100_000})
    rot = quality.method_config("rotation", preset, "data", tmp_path)
    gan = quality.method_config("bigan", preset, "data", tmp_path)
    rp = quality.method_config("relative_position", preset, "data", tmp_path)
    assert rot["trainer"]["max_steps"] == -(-25_000 // rot["data"]["batch_size"])
    assert gan["trainer"]["max_steps"] == 2 * -(-25_000 // gan["data"]["batch_size"])
    assert rp["trainer"]["max_steps"] == -(-100_000 // rp["data"]["batch_size"])
    # the image budget alone ends a run, even one longer than an epoch
    assert rot["trainer"]["max_epochs"] == rp["trainer"]["max_epochs"] == -1


@pytest.mark.parametrize("stop, code", [("TrainingStopped", 143), ("TrainingInterrupted", 130)])
def test_quality_stopped_pretraining_exits_with_the_signals_code(bench, tmp_path, monkeypatch, capsys, stop, code):
    import quality

    from selfsup import errors

    def stopped(cfg, work):
        raise getattr(errors, stop)("stopped at step 3: checkpoints/x.ckpt; rerun to resume")

    monkeypatch.setattr(quality, "pretrain_once", stopped)
    rc = quality.main(["--preset", "cpu-smoke", "--methods", "rotation", "--work", str(tmp_path / "w"),
                       "--out", str(tmp_path / "q")])
    assert rc == code  # SIGTERM 143, Ctrl-C 130, as the shell would report the signal
    assert "quality.py: rotation: stopped at step 3" in capsys.readouterr().err
