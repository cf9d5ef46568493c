"""Run directories are claimed atomically: two runs with one name never share a directory (issue 11, item 1)."""

import csv
import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import yaml

from selfsup.errors import RunDirError
from selfsup.runs import LOCK_NAME, claim_run_dir, merge_metrics, set_aside_metrics
from tests.conftest import ROOT


def _claim(args):
    output, barrier, results = args
    barrier.wait()
    try:
        with claim_run_dir(output, "same", "x", resume=False) as run_dir:
            (run_dir / "config.yaml").write_text(f"pid: {os.getpid()}\n")
            barrier.wait()  # hold the directory while the others try
        results.put("ok")
    except RunDirError as err:
        barrier.wait()
        results.put(str(err))


def test_only_one_of_many_processes_claims_a_name(tmp_path):
    ctx = mp.get_context("fork")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=((tmp_path, barrier, results),)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    out = [results.get(timeout=5) for _ in range(n)]
    assert out.count("ok") == 1, out
    assert all("already exists" in o or "in use" in o for o in out if o != "ok")
    assert list((tmp_path / "same").iterdir()) == [tmp_path / "same" / "config.yaml"]  # lock released


def test_default_names_are_numbered_and_failed_claims_leave_nothing(tmp_path):
    with claim_run_dir(tmp_path, None, "rot", resume=False) as a, claim_run_dir(tmp_path, None, "rot", resume=False) as b:
        assert (a.name, b.name) == ("rot", "rot-1")
        assert (a / LOCK_NAME).is_file()
        (a / "config.yaml").write_text("x")
        (b / "config.yaml").write_text("x")
    with pytest.raises(ValueError), claim_run_dir(tmp_path, "broken", "rot", resume=False):
        raise ValueError("setup failed before anything was written")
    assert not (tmp_path / "broken").exists()


def test_a_live_lock_refuses_resume_and_a_dead_one_is_taken_over(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("x")
    import json
    import socket

    (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(RunDirError, match="in use by another selfsup run"), claim_run_dir(tmp_path, "r", "r", True):
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with claim_run_dir(tmp_path, "r", "r", resume=True) as got:
        assert got == run
    assert not (run / LOCK_NAME).exists()


def test_merge_drops_rows_redone_after_a_resume(tmp_path):
    def write(path, steps):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "train/loss"])
            w.writeheader()
            w.writerows({"step": s, "train/loss": f"{s}.{tag}"} for s in steps)

    tag = "first"
    write(tmp_path / "metrics.csv", range(0, 8))  # killed at step 8, its checkpoint was at step 5
    set_aside_metrics(tmp_path)
    tag = "second"
    write(tmp_path / "metrics.csv", range(5, 12))  # resumed at 5, killed again; checkpoint at 10
    set_aside_metrics(tmp_path)
    tag = "third"
    write(tmp_path / "metrics.csv", range(10, 14))
    merge_metrics(tmp_path, resumed_step=10)
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(14))
    assert rows[4]["train/loss"] == "4.first" and rows[7]["train/loss"] == "7.second"
    assert rows[11]["train/loss"] == "11.third"


@pytest.mark.slow
def test_two_cli_runs_with_one_name_started_together(tmp_path):
    args = [sys.executable, "-m", "selfsup", "pretrain", "--backbone", "convnet_small", "--image-size", "8",
            "--batch-size", "256", "--max-steps", "2", "--name", "same", "--no-online-probe", "--log-every-n-steps", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    loser = outs[[p.returncode for p in procs].index(2)][1]
    assert ("already exists" in loser or "in use" in loser) and len(loser.strip().splitlines()) == 1, loser
    run = tmp_path / "runs" / "same"
    assert yaml.safe_load((run / "config.yaml").read_text())["name"] == "same"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    with (run / "metrics.csv").open() as f:
        steps = [r["step"] for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == ["0", "1"]  # one run's rows only


def test_a_rerun_takes_over_a_dir_left_with_no_checkpoint_and_no_export(tmp_path, capsys):
    import json
    import socket

    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("x")
    (run / "metrics.csv").write_text("step\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with claim_run_dir(tmp_path, "r", "r", resume=False) as got:
        assert got == run and sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
        (run / "config.yaml").write_text("new")
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_text("ckpt")
    assert "reusing" in capsys.readouterr().err
    # a checkpoint, an export or a live lock keeps a directory its run's
    with pytest.raises(RunDirError, match="already exists"), claim_run_dir(tmp_path, "r", "r", resume=False):
        pass
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "export").mkdir()
    with pytest.raises(RunDirError, match="already exists"), claim_run_dir(tmp_path, "r", "r", resume=False):
        pass
    (run / "export").rmdir()
    (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(RunDirError, match="in use by pid"), claim_run_dir(tmp_path, "r", "r", resume=False):
        pass
    assert (run / "config.yaml").read_text() == "new"


def test_a_run_failing_before_its_first_checkpoint_removes_its_dir(tmp_path):
    with pytest.raises(ValueError), claim_run_dir(tmp_path, "early", "rot", resume=False) as run:
        (run / "config.yaml").write_text("x")
        (run / "checkpoints").mkdir()
        raise ValueError("failed at startup")
    assert not (tmp_path / "early").exists()
    with pytest.raises(ValueError), claim_run_dir(tmp_path, "late", "rot", resume=False) as run:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_text("ckpt")
        raise ValueError("failed after a checkpoint")
    assert (tmp_path / "late" / "checkpoints" / "last.ckpt").is_file()  # resumable: kept


@pytest.mark.slow
def test_pretrain_failing_at_train_start_leaves_no_dir_and_a_rerun_works(tmp_path):
    from pytorch_lightning.callbacks import Callback

    from selfsup.train import pretrain

    class FailAtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            raise RuntimeError("startup failure")

    cfg = {"method": "rotation", "model": {"backbone": "convnet_small"}, "data": {"image_size": 8},
           "trainer": {"max_steps": 1}, "online_probe": False, "output": str(tmp_path), "name": "n"}
    with pytest.raises(RuntimeError, match="startup failure"):
        pretrain(cfg, callbacks=[FailAtStart()])
    assert not (tmp_path / "n").exists()
    assert (pretrain(cfg).run_dir / "export" / "config.json").is_file()


# --------------------------------------------------------------------------------------------------
# issue 21, item 1: a run name is a plain name, and a folder selfsup did not make is never emptied
# --------------------------------------------------------------------------------------------------


def _others(root):
    """Another finished run and user files around ``root/runs``; returns what must survive, by path."""
    files = {
        root / "notes.txt": "user file in the working directory",
        root / "runs" / "README": "user file beside the runs",
        root / "runs" / "done" / "config.yaml": "method: rotation\nname: done\n",
        root / "runs" / "done" / "checkpoints" / "last.ckpt": "ckpt",
        root / "runs" / "done" / "export" / "config.json": "{}",
    }
    for p, text in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return files


@pytest.mark.parametrize("name", [".", "..", "../x", "ABS", "a b", "a;b", "a/b", ""])
def test_a_run_name_that_is_not_a_plain_name_is_refused_and_deletes_nothing(tmp_path, name):
    from tests.conftest import run_cli_here

    name = str(tmp_path / "abs") if name == "ABS" else name  # an absolute path, inside this test's folder
    files = _others(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = run_cli_here("pretrain", "--data", "digits", "--image-size", "8", "--backbone", "convnet_small",
                     "--max-steps", "1", "--no-online-probe", "--name", name, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "plain run name" in lines[0] and repr(name) in lines[0], r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert all(p.read_text() == text for p, text in files.items())


def test_a_run_name_is_checked_in_config_files_the_python_api_and_the_quality_benchmark(tmp_path):
    from selfsup.errors import ConfigError
    from selfsup.train import pretrain
    from tests.conftest import run_cli_here

    files = _others(tmp_path)
    cfg = {"method": "rotation", "model": {"backbone": "convnet_small"}, "data": {"image_size": 8},
           "trainer": {"max_steps": 1}, "online_probe": False, "output": str(tmp_path / "runs")}
    for name in (".", "..", "../escape"):
        with pytest.raises(ConfigError, match="plain run name"):
            pretrain({**cfg, "name": name})
        with pytest.raises(ConfigError, match="plain run name"):
            pretrain({**cfg, "name": name}, resume=True)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**cfg, "name": ".."}))
    r = run_cli_here("pretrain", "--config", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "plain run name" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    with pytest.raises(ConfigError, match="plain run name"), claim_run_dir(tmp_path, "..", "x", resume=False):
        pass
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    with pytest.raises(ConfigError, match="plain run name"):
        quality.pretrain_once({**cfg, "name": ".."}, tmp_path / "runs" / "done")
    assert all(p.read_text() == text for p, text in files.items())


def test_a_folder_selfsup_did_not_make_is_never_emptied(tmp_path, capsys):
    import json
    import socket

    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "data.txt").write_text("precious")
    (user / "sub" / "more.txt").write_text("precious too")
    (user / "config.yaml").write_text("my: own config\n")  # a config.yaml, but not this run's
    # no checkpoint, no export, no lock: today's claim took it for a dead run's leftover and emptied it
    with pytest.raises(RunDirError, match="not a selfsup run"), claim_run_dir(tmp_path, "mine", "x", resume=False):
        pass
    assert (user / "data.txt").read_text() == "precious" and (user / "sub" / "more.txt").is_file()
    # a selfsup config.yaml of another name (copied in by hand) does not make it this run's either
    (user / "config.yaml").write_text("method: rotation\nname: other\n")
    with pytest.raises(RunDirError, match="not a selfsup run"), claim_run_dir(tmp_path, "mine", "x", resume=False):
        pass
    assert (user / "data.txt").read_text() == "precious"
    # what selfsup made (its own config.yaml, or a dead run's lock) is still a leftover a rerun takes
    for marker in ("config", "lock"):
        run = tmp_path / f"dead-{marker}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "metrics.csv").write_text("step\n")
        if marker == "config":
            (run / "config.yaml").write_text(f"method: rotation\nname: {run.name}\n")
        else:
            dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True)
            (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
        with claim_run_dir(tmp_path, run.name, "x", resume=False) as got:
            assert got == run and sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
            (run / "export").mkdir()
        assert "reusing" in capsys.readouterr().err
