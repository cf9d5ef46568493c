"""`selfsup features|probe|knn|sweep` end to end on the embedded digits, as a user runs them."""

import json
import shutil
import sys

import pytest

from selfsup.train import pretrain
from tests.conftest import run_cli, run_cli_here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = {"model": {"backbone": "convnet_small"}, "data": {"data": "digits", "image_size": 16, "batch_size": 128},
           "trainer": {"max_epochs": 1},
           "output": str(out), "name": "tiny"}
    return pretrain(cfg).run_dir


def test_probe_and_knn_report_the_encoder_beside_its_baselines(run_dir):
    for cmd, file in (("probe", "probe.json"), ("knn", "knn_k20.json")):
        r = run_cli(cmd, str(run_dir), "--device", "cpu", cwd=run_dir.parent)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads((run_dir / "eval" / file).read_text())
        prov = res["provenance"]
        assert prov["encoder"]["method"] == "rotation" and len(prov["encoder"]["hash"]) == 64
        assert prov["data"]["n_train"] == 1437 and prov["data"]["image_size"] == "16" and prov["data"]["transform"]
        assert prov["features"]["dtype"] == "float32" and prov["hardware"]["device"] == "cpu"
        assert prov["hardware"]["world_size"] == 1 and prov["software"]["torch"] and prov["wall_seconds"] > 0
        row = res["results"]["rotation (tiny)"]
        assert row["encoder_hash"] == prov["encoder"]["hash"]
        if cmd == "probe":
            assert row["fit"]["solver"] == "lbfgs" and row["fit"]["converged"] and row["fit"]["iterations"] >= 5
            assert prov["settings"]["linear_probe"]["weight_decays"][0] == 1e-6
        else:
            assert row["k"] == 20 and row["temperature"] is None and row["backend"] == "faiss"
        assert res["data"] == "digits"
        names = list(res["results"])
        assert names[0] == "rotation (tiny)" and names[1].startswith("random init") and names[2] == "pixels"
        assert all(0 < row["top1"] <= row["top5"] <= 100 for row in res["results"].values())
        assert res["results"]["pixels"]["features"] == 3 * 16 * 16
    # the features were cached under the run: one file per encoder and split
    assert len(list((run_dir / "features").glob("*.safetensors"))) == 6
    # another k writes its own file: the first result is kept
    r = run_cli("knn", str(run_dir), "--k", "5", "--temperature", "0.07", "--no-baselines", cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "eval" / "knn_k5_t0.07.json").is_file() and (run_dir / "eval" / "knn_k20.json").is_file()


def test_features_command_reuses_the_cache(run_dir):
    r = run_cli("features", str(run_dir / "export"), "--no-baselines", cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train (1437, 128)" in r.stdout and "test (360, 128)" in r.stdout


def test_sweep_writes_json_png_and_supervised_and_finetune_lines(run_dir):
    r = run_cli("sweep", str(run_dir), "--ks", "1,5,500,all", "--seeds", "2", "--supervised", "--finetune",
                "--finetune-steps", "3", cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run_dir / "eval" / "sweep.json").read_text())
    assert [b["name"] for b in res["budgets"]] == ["k=1", "k=5", "all"]
    # k=500 is more than any digit class has: left out, and the user is told (it vanished silently)
    assert "note: --ks 500 left out: no class has more than" in r.stdout
    prov = res["provenance"]
    assert prov["settings"]["seeds"] == [0, 1] and prov["data"]["fingerprint"] and prov["encoder"]["hash"]
    assert res["features"]["pixels"]["feature_dtype"] == "float32"
    run = res["results"]["rotation (tiny)"]["linear"][0]["runs"][0]
    assert run["solver"] == "lbfgs" and run["converged"] and run["iterations"] >= 5
    assert set(res["results"]["rotation (tiny)"]) == {"linear", "knn", "finetune"}
    assert set(res["results"]["supervised (same backbone, from scratch)"]) == {"finetune"}
    assert set(res["results"]["pixels"]) == {"linear", "knn"}
    assert len(res["results"]["pixels"]["linear"][0]["runs"]) == 2
    png = (run_dir / "eval" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_random_init_source(tmp_path):
    r = run_cli("knn", "--random-init", "convnet_small", "--data", "digits", "--image-size", "16",
                "--output", str(tmp_path / "rnd"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "rnd" / "knn_k20.json").read_text())
    assert list(res["results"]) == ["random-init convnet_small", "pixels"]


@pytest.mark.parametrize("args,message", [
    (["probe", "/no/such/run"], "/no/such/run does not exist: /no/such does not exist either (selfsup pretrain "
                                "writes runs/<name>/"),
    (["probe"], "either a run or export directory"),
])
def test_eval_errors_are_one_line(tmp_path, args, message):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def one_line_error(r, message: str) -> None:
    """The command failed with exit status 2 and one `selfsup...: error: ...` line holding ``message``."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("selfsup") and ": error: " in lines[0], r.stderr[-3000:]
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("args,message", [
    (["probe", "runs/x", "--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    (["knn", "runs/x", "--batch-size", "-4"], "argument --batch-size: must be a positive integer"),
    (["features", "runs/x", "--image-size", "0"], "argument --image-size: must be a positive integer, got '0'"),
    (["sweep", "runs/x", "--image-size", "big"], "argument --image-size: expected a whole number, got 'big'"),
    (["probe", "runs/x", "--accelerator", "tpu"], "argument --accelerator: invalid choice"),
    (["sweep", "runs/x", "--seeds", "0"], "argument --seeds: must be a positive integer, got '0'"),
    (["sweep", "runs/x", "--seeds", "-2"], "argument --seeds: must be a positive integer, got '-2'"),
    (["sweep", "runs/x", "--finetune", "--finetune-steps", "0"],
     "argument --finetune-steps: must be a positive integer, got '0'"),
])
def test_bad_sizes_are_one_line_errors(tmp_path, args, message):
    one_line_error(run_cli_here(*args, cwd=tmp_path), message)


@pytest.mark.parametrize("args,message", [
    (["--accelerator", "gpu"], "--accelerator gpu was given, but torch sees no CUDA GPU here"),
    (["--accelerator", "cuda"], "--accelerator cuda was given, but torch sees no CUDA GPU here"),
    (["--device", "cuda"], "--device cuda was given, but torch sees no CUDA GPU here"),
])
def test_gpu_options_without_a_gpu_are_one_line_errors(tmp_path, args, message):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = run_cli_here("knn", "--random-init", "convnet_small", "--data", "digits", *args, "--output", str(tmp_path),
                     cwd=tmp_path)
    one_line_error(r, message)


def test_plot_retrieval_asks_for_no_more_than_the_data_has(run_dir):
    r = run_cli_here("plot", str(run_dir), "retrieval", "--queries", "100000", cwd=run_dir.parent)
    one_line_error(r, "--queries 100000 is more than the 360 test images of digits; give at most 360")
    r = run_cli_here("plot", str(run_dir), "retrieval", "--k", "100000", cwd=run_dir.parent)
    one_line_error(r, "--k 100000 is more than the 1437 training images of digits; give at most 1437")


def test_distributed_extraction_through_the_cli(tmp_path):
    r = run_cli("knn", "--random-init", "convnet_small", "--data", "digits", "--image-size", "16", "--devices", "2",
                "--strategy", "ddp", "--accelerator", "cpu", "--output", str(tmp_path / "ddp"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("results:") == 1  # the probes ran once, on rank 0
    res = json.loads((tmp_path / "ddp" / "knn_k20.json").read_text())
    single = run_cli("knn", "--random-init", "convnet_small", "--data", "digits", "--image-size", "16",
                     "--output", str(tmp_path / "one"), cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "knn_k20.json").read_text())["results"]
    assert strip_seconds(one) == strip_seconds(res["results"])


def strip_seconds(obj):
    if isinstance(obj, dict):
        return {k: strip_seconds(v) for k, v in obj.items() if k not in ("seconds", "wall_seconds")}
    if isinstance(obj, list):
        return [strip_seconds(v) for v in obj]
    return obj


def test_sweep_fits_spread_over_two_ddp_processes_equal_one_process(tmp_path, monkeypatch):
    # one BLAS thread per process in both runs (Lightning gives each DDP rank one on 2 cores): the L-BFGS
    # iteration counts are then equal too, not only the accuracies and chosen strengths
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ("sweep", "--random-init", "convnet_small", "--data", "digits", "--image-size", "8", "--ks", "1,all",
              "--seeds", "2", "--no-baselines", "--device", "cpu")
    r = run_cli(*common, "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
                "--output", str(tmp_path / "ddp"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("results:") == 1  # written once, by rank 0
    ddp = json.loads((tmp_path / "ddp" / "sweep.json").read_text())
    assert ddp["world_size"] == 2 and ddp["provenance"]["hardware"]["world_size"] == 2
    single = run_cli(*common, "--output", str(tmp_path / "one"), cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "sweep.json").read_text())
    assert strip_seconds(one["results"]) == strip_seconds(ddp["results"])


def test_probe_is_data_parallel_over_two_ddp_processes(tmp_path, monkeypatch):
    """`selfsup probe --strategy ddp --devices 2`: one probe, its rows split over 2 CPU processes (gloo); rank 0
    writes probe.json, which records the world size and equals one process's probe of the same cached features."""
    import torch

    from selfsup.eval import harness

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "ddp"
    r = run_cli("probe", "--random-init", "convnet_small", "--data", "digits", "--image-size", "8", "--no-baselines",
                "--device", "cpu", "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu", "--output", str(out),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("results:") == 1  # written once, by rank 0
    res = json.loads((out / "probe.json").read_text())
    assert res["provenance"]["hardware"]["world_size"] == 2
    (ddp,) = res["results"].values()
    src = harness.resolve_source(None, "convnet_small", str(out))
    ev = harness.prepare(src, "digits", 8, baselines=False, progress=False)  # the features the ranks cached
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = harness.evaluate(ev, "probe", device="cpu")[src.name]
    finally:
        torch.set_num_threads(threads)
    assert ddp["world_size"] == 2 and one["world_size"] == 1 and ddp["n_train"] == 1437
    for key in ("weight_decay", "C", "val_top1", "top1", "top5", "n_train", "n_val", "n_test"):
        assert ddp[key] == one[key], key
    assert [p["weight_decay"] for p in ddp["val_curve"]] == [p["weight_decay"] for p in one["val_curve"]]


def write_folder_with_bad_images(root, n_train=12, n_val=4):
    """An ImageNet-layout folder of 16 px PNGs (classes cat and dog), one unreadable file per split."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (root / "train" / "cat" / "bad.png").write_bytes(b"not an image")
    (root / "val" / "dog" / "bad.png").write_bytes(b"not an image either")
    return root


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """A run pretrained with --skip-bad-images on a folder holding unreadable files."""
    base = tmp_path_factory.mktemp("bad")
    data = write_folder_with_bad_images(base / "imgs")
    cfg = {"model": {"backbone": "convnet_small"}, "data": {"data": str(data), "batch_size": 8, "skip_bad": True},
           "trainer": {"max_steps": 2}, "online_probe": False, "output": str(base / "runs"), "name": "bad"}
    return pretrain(cfg).run_dir


def test_evaluation_inherits_the_runs_skip_bad_images(bad_run):
    r = run_cli("features", str(bad_run), "--no-baselines", cwd=bad_run.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train (24, " in r.stdout and "test (8, " in r.stdout  # the two bad files were skipped
    r = run_cli("knn", str(bad_run), "--no-baselines", "--k", "3", cwd=bad_run.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((bad_run / "eval" / "knn_k3.json").read_text())
    assert res["provenance"]["data"]["skip_bad_images"] is True and res["provenance"]["data"]["n_train"] == 24
    # turned off, the same data stops at the first bad file, in one line naming the flag that skips it
    r = run_cli("features", str(bad_run), "--no-baselines", "--no-skip-bad-images", cwd=bad_run.parent)
    one_line_error(r, "bad.png is not a readable image")
    assert "--skip-bad-images" in r.stderr


def test_skip_bad_images_flag_for_an_export_or_a_random_init(bad_run, tmp_path):
    data = str(bad_run.parent.parent / "imgs")
    r = run_cli("features", "--random-init", "convnet_small", "--data", data, "--no-baselines", "--output",
                str(tmp_path / "rnd"), cwd=tmp_path)
    one_line_error(r, "bad.png is not a readable image")
    r = run_cli("features", "--random-init", "convnet_small", "--data", data, "--no-baselines", "--output",
                str(tmp_path / "rnd"), "--skip-bad-images", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train (24, " in r.stdout
    # an export copied away from its run (no config.yaml beside it) still skips what its run skipped
    shutil.copytree(bad_run / "export", tmp_path / "moved" / "export")
    r = run_cli("features", str(tmp_path / "moved" / "export"), "--no-baselines", "--output", str(tmp_path / "mv"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train (24, " in r.stdout


def test_skipped_images_warn_in_one_selfsup_line_each_once(bad_run):
    # a cached folder: one line per split, no "path.py:123: UserWarning" and no echoed source line
    r = run_cli("features", str(bad_run), "--no-baselines", cwd=bad_run.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "bad file" in ln or "bad image" in ln]  # not the folder's name
    assert len(lines) == 2 and all(ln.startswith("selfsup: warning: skipped 1 bad file(s) in ") for ln in lines), lines
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr and "_load_folder" not in r.stderr
    # a streamed folder (over 96 px) warns from each bad file it meets: the first one only, per pass
    r = run_cli("features", str(bad_run), "--no-baselines", "--image-size", "128", "--dtype", "float16",
                cwd=bad_run.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "bad file" in ln or "bad image" in ln]  # not the folder's name
    assert 1 <= len(lines) <= 2 and all(ln.startswith("selfsup: warning: skipping bad image: ") for ln in lines), lines
    assert "UserWarning" not in r.stderr and "skip_bad=True" not in r.stderr


def test_one_line_warnings_collapse_repeats_and_leave_other_libraries_alone(capsys):
    import warnings

    from selfsup import quiet

    def show(message, category, filename, lineno, file=None, line=None):  # Python's own display (pytest records)
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        with quiet.one_line_warnings():
            for i in range(5):
                warnings.warn(f"skipping bad image: /d/{i}.png is not a readable image: replace or remove it, "
                              "or pass --skip-bad-images (skip_bad=True) to skip bad files", stacklevel=1)
            quiet.warnings.warn_explicit("same text", UserWarning, quiet.__file__, 1)
            quiet.warnings.warn_explicit("same text", UserWarning, quiet.__file__, 1)
            warnings.warn_explicit("from elsewhere", UserWarning, "/some/lib.py", 7)
        with pytest.warns(UserWarning, match="same text"), quiet.one_line_warnings():  # recording still works
            quiet.warnings.warn_explicit("same text", UserWarning, quiet.__file__, 1)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("selfsup: warning: skipping bad image: /d/0.png is not a readable image "
                      "(further bad images are skipped without a line each)")
    assert err[1] == "selfsup: warning: same text"
    assert err[2] == "/some/lib.py:7: UserWarning: from elsewhere"  # another library's keeps Python's format
    assert len(err) == 3


def test_sweep_notes_and_records_classes_with_fewer_than_k_images(tmp_path):
    data = write_folder_with_bad_images(tmp_path / "imgs")
    for i in range(3):  # cat: 9 readable training images, dog: 12
        (data / "train" / "cat" / f"{i}.png").unlink()
    r = run_cli("sweep", "--random-init", "convnet_small", "--data", str(data), "--skip-bad-images", "--ks", "1,10,all",
                "--seeds", "1", "--methods", "knn", "--no-baselines", "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("note: k=10: 1 class has fewer than 10 training images, so that budget uses all of them: cat (9)"
            in r.stdout)
    res = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert res["classes_under_k"] == {"k=10": {"cat": 9}}
    assert res["budgets"][1]["classes_under_k"] == [{"class": 0, "n": 9, "name": "cat"}]
    assert res["budgets"][1]["n_labels"] == 19


def test_features_help_says_what_it_does_and_where_it_writes(tmp_path):
    r = run_cli("features", "--help", cwd=tmp_path)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    assert "train and test splits" in text and "<run>/features/" in text and "safetensors" in text
    assert "probe, knn, sweep, plot and report read them from there" in text


def test_results_on_other_data_or_size_do_not_overwrite_the_runs_own(run_dir):
    from selfsup.eval.harness import data_label

    own = run_dir / "eval" / "knn_k5.json"
    r = run_cli("knn", str(run_dir), "--k", "5", "--no-baselines", cwd=run_dir.parent)  # digits at the run's 16 px
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"results: {own}" in r.stdout
    before = own.read_bytes()
    r = run_cli("knn", str(run_dir), "--k", "5", "--no-baselines", "--image-size", "8", cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    other = run_dir / "eval" / data_label("digits", 8) / "knn_k5.json"
    assert data_label("digits", 8).startswith("digits-8px-")
    assert f"results: {other}" in r.stdout and own.read_bytes() == before
    assert json.loads(other.read_text())["provenance"]["data"]["image_size"] == "8"
    # the same data named differently is still the run's own; --output is used as given
    r = run_cli("knn", str(run_dir), "--k", "5", "--no-baselines", "--data", "digits", "--image-size", "16",
                cwd=run_dir.parent)
    assert f"results: {own}" in r.stdout
    r = run_cli("knn", str(run_dir), "--k", "5", "--no-baselines", "--image-size", "8", "--output",
                str(run_dir.parent / "mine"), cwd=run_dir.parent)
    assert r.returncode == 0 and (run_dir.parent / "mine" / "knn_k5.json").is_file()
    assert not (run_dir.parent / "mine" / "features").exists()  # a run's cache stays in the run


def test_not_found_messages_say_what_was_looked_for_and_where(run_dir):
    cwd = run_dir.parent.parent  # runs live in <cwd>/<runs folder>/tiny
    runs = run_dir.parent.name
    r = run_cli_here("probe", f"{runs}/tinyy", cwd=cwd)
    one_line_error(r, f"{runs}/tinyy does not exist: did you mean {runs}/tiny?")
    r = run_cli_here("knn", f"{runs}/zzzzzz", cwd=cwd)
    one_line_error(r, f"{runs}/zzzzzz does not exist: the runs in {runs}/ are: ")
    r = run_cli_here("sweep", runs, cwd=cwd)
    one_line_error(r, f"{runs} is a folder of runs (")
    r = run_cli_here("plot", f"{runs}/tinyy", "curves", cwd=cwd)
    one_line_error(r, f"{runs}/tinyy does not exist: did you mean {runs}/tiny?")
    r = run_cli_here("report", str(run_dir / "checkpoints" / "last.ckpt"), cwd=cwd)
    one_line_error(r, "is a checkpoint, and this command takes a run directory: pass ")


def test_a_lightning_checkpoint_is_evaluated_beside_not_over_the_run(run_dir):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    r = run_cli("knn", str(ckpt), "--no-baselines", "--k", "7", cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    out = run_dir / "eval" / "checkpoint-last" / "knn_k7.json"
    assert f"results: {out}" in r.stdout and not (run_dir / "eval" / "knn_k7.json").exists()
    res = json.loads(out.read_text())
    assert res["provenance"]["encoder"]["source"] == str(ckpt.resolve())
    assert res["provenance"]["data"]["image_size"] == "16"  # the run's size, from its config
    (name,) = res["results"]
    assert name.startswith("rotation (tiny, last.ckpt")


def test_output_paths_are_honoured_and_created(run_dir, tmp_path):
    (tmp_path / "afile.json").write_text("{}")
    r = run_cli_here("knn", str(run_dir), "--no-baselines", "--output", str(tmp_path / "afile.json"), cwd=tmp_path)
    one_line_error(r, "afile.json is a file; --output takes the results directory")
    r = run_cli("knn", str(run_dir), "--no-baselines", "--output", str(tmp_path / "new" / "deep"), cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "new" / "deep" / "knn_k20.json").is_file()
    (tmp_path / "pics").mkdir()
    for given, written in (("pics", "pics/curves.png"), ("more/pics/", "more/pics/curves.png"), ("c", "c.png")):
        r = run_cli_here("plot", str(run_dir), "curves", "-o", given, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"curves: {written}" in r.stdout and (tmp_path / written).is_file()
    r = run_cli_here("report", str(run_dir), "--no-pictures", "-o", "pics", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "pics" / "report.html").is_file() and not list(tmp_path.glob("*.tmp"))
