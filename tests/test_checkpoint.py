"""Atomic writes, safe loading, fallback to the newest good checkpoint, temp files cleaned (issue 11, 4/6/7/8)."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import selfsup
from selfsup.checkpoint import (
    AtomicCheckpointIO,
    atomic_write_text,
    clean_stale_temp_files,
    find_resumable_checkpoint,
    load_checkpoint,
)
from selfsup.errors import CheckpointError, ConfigError, SelfsupError
from selfsup.pretext.rotation import Rotation
from tests.conftest import ROOT


def _ckpt(step: int) -> dict:
    return {"state_dict": {"w": torch.full((3,), float(step))}, "global_step": step, "epoch": 0}


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        from selfsup.checkpoint import atomic_write

        with atomic_write(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(p.with_suffix(".good").read_bytes()[:200]), "cannot be loaded"),
        (lambda p: p.write_bytes(os.urandom(4096)), "(cannot be|was not) loaded"),
        (lambda p: torch.save({"weights": torch.zeros(2)}, p), "not a selfsup/Lightning training checkpoint"),
        (lambda p: torch.save([1, 2], p), "not a selfsup/Lightning training checkpoint"),
    ],
)
def test_bad_checkpoints_are_one_typed_line(tmp_path, make, message):
    good = tmp_path / "c.good"
    torch.save(_ckpt(1), good)
    path = tmp_path / "c.ckpt"
    make(path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, SelfsupError)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_a_command_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as f:
        pickle.dump({"state_dict": {}, "global_step": 0, "x": _RunsACommand(marker)}, f)
    with pytest.raises(CheckpointError, match="not a plain checkpoint and was not loaded"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        AtomicCheckpointIO().load_checkpoint(path)  # what Lightning's resume calls
    assert not marker.exists()


def test_a_crafted_checkpoint_is_refused_without_torchs_unsafe_advice(tmp_path):
    """Issue 21, item 13: torch's refusal advises re-running with ``weights_only=False`` (which runs the code)."""
    import torch
    import yaml

    from tests.conftest import run_cli_here

    marker = tmp_path / "pwned"
    raw, zipped = tmp_path / "raw.ckpt", tmp_path / "zipped.ckpt"
    with raw.open("wb") as f:
        pickle.dump({"state_dict": {}, "global_step": 0, "x": _RunsACommand(marker)}, f)
    torch.save({"state_dict": {}, "global_step": 0, "x": _RunsACommand(marker)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        said = str(err.value)
        assert said.startswith(f"checkpoint {path} is not a plain checkpoint and was not loaded (")
        assert "weights_only" not in said and "\n" not in said
    assert "it names code to run: " in said and "system" in said  # torch.save's file names os.system
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(CheckpointError, match="not a plain checkpoint and was not loaded") as err:
        load_checkpoint(junk)
    assert "weights_only" not in str(err.value)
    # what a user sees when the run to resume holds only such a file
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "rotation", "name": "r", "online_probe": False,
                                                     "model": {"backbone": "convnet_small"},
                                                     "data": {"image_size": 8}}))
    (run / "checkpoints" / "last.ckpt").write_bytes(zipped.read_bytes())
    r = run_cli_here("pretrain", "--resume", "--name", "r", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a plain checkpoint" in r.stderr and "weights_only" not in r.stderr, r.stderr
    assert not marker.exists()


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(5), tmp_path / "epoch=0-step=5.ckpt")
    io.save_checkpoint(_ckpt(10), tmp_path / "last.ckpt")
    os.utime(tmp_path / "epoch=0-step=5.ckpt", (1, 1))
    assert find_resumable_checkpoint(tmp_path, say=lambda m: None)[0].name == "last.ckpt"
    (tmp_path / "last.ckpt").write_bytes(b"")  # truncated by a kill (the pre-fix failure)
    said = []
    path, ckpt = find_resumable_checkpoint(tmp_path, say=said.append)
    assert path.name == "epoch=0-step=5.ckpt" and ckpt["global_step"] == 5
    assert len(said) == 1 and f"resuming from {tmp_path / 'epoch=0-step=5.ckpt'} (epoch 0, step 5)" in said[0]
    assert "skipped 1 unusable checkpoint(s)" in said[0] and "last.ckpt" in said[0]
    (tmp_path / "epoch=0-step=5.ckpt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no checkpoint in .* loads"):
        find_resumable_checkpoint(tmp_path, say=said.append)


def test_stale_temp_files_are_cleaned_but_live_ones_kept(tmp_path):
    dead = tmp_path / f"last.ckpt.tmp-{_dead_pid()}"
    live = tmp_path / f"last.ckpt.tmp-{os.getppid()}"
    other = tmp_path / "notes.txt"
    for p in (dead, live, other):
        p.write_text("x")
    assert clean_stale_temp_files(tmp_path) == [dead]
    assert live.exists() and other.exists()


KILL_MID_SAVE = """
import os, signal, sys, torch
from selfsup.checkpoint import AtomicCheckpointIO
import selfsup.checkpoint as c
real = torch.save
def half_then_die(obj, f):
    f.write(b"PK" * 1000); f.flush(); os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
c.torch.save = half_then_die
AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 2}, sys.argv[1])
"""


@pytest.mark.slow
def test_sigkill_mid_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_ckpt(1), path)
    r = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(path)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1  # the half-written temp file, never the checkpoint itself
    assert load_checkpoint(path)["global_step"] == 1
    assert clean_stale_temp_files(tmp_path) == leftovers  # the next run removes the leak
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _export(tmp_path):
    torch.manual_seed(0)
    m = Rotation(backbone="convnet_small")
    return m.export(tmp_path / "export")


def test_export_whose_config_no_longer_matches_its_weights(tmp_path):
    d = _export(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hparams"]["backbone"] = "cifar_resnet18"
    (d / "config.json").write_text(json.dumps(cfg))
    # caught by the recorded feature count before the weights are read (or by the weights' shapes)
    with pytest.raises(CheckpointError, match=r"exported with 128 features, but rotation now builds 512|does not match") as err:
        selfsup.load_encoder(d)
    assert str(d) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "damage,error,message",
    [
        (lambda d: (d / "encoder.safetensors").write_bytes(b""), CheckpointError, "cannot be read"),
        (lambda d: (d / "encoder.safetensors").write_bytes((d / "encoder.safetensors").read_bytes()[:500]),
         CheckpointError, "cannot be read"),
        (lambda d: (d / "config.json").write_text("{not json"), CheckpointError, "not a readable export config"),
        (lambda d: (d / "config.json").write_text("[1]"), CheckpointError, "unsupported export format"),
        (lambda d: (d / "config.json").write_text(json.dumps({"format": 1, "method": "rotation",
                                                              "hparams": {"lr": "fast"}})), ConfigError, "lr"),
    ],
)
def test_damaged_exports_are_one_typed_line(tmp_path, damage, error, message):
    d = _export(tmp_path)
    damage(d)
    with pytest.raises(error, match=message) as err:
        selfsup.load_encoder(d)
    assert "\n" not in str(err.value)


def test_export_writes_no_temp_files(tmp_path):
    d = _export(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "encoder.safetensors"]


def test_resume_picks_the_most_trained_checkpoint_whatever_the_mtimes(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(12), tmp_path / "step=12.ckpt")
    io.save_checkpoint(_ckpt(10), tmp_path / "last.ckpt")
    os.utime(tmp_path / "step=12.ckpt", (1, 1))  # a copy (cp -r) scrambles modification times
    path, ckpt = find_resumable_checkpoint(tmp_path, say=lambda m: None)
    assert path.name == "step=12.ckpt" and ckpt["global_step"] == 12


def _add_keys(path: str, worker: int, count: int) -> None:
    from selfsup.checkpoint import update_json

    for i in range(count):
        update_json(path, {f"{worker}-{i}": i})


def test_update_json_keeps_every_writers_keys(tmp_path):
    """Processes sharing one JSON file (the quality benchmark's baseline memo, say) each merge their
    entries under a lock: none is dropped by another's read-modify-write, and the file is valid JSON."""
    import multiprocessing as mp

    from selfsup.checkpoint import update_json

    path = tmp_path / "memo.json"
    update_json(path, {"first": 0})
    # fork: the children only read and write JSON (no torch), and start in milliseconds
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_add_keys, args=(str(path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = json.loads(path.read_text())
    assert set(got) == {"first"} | {f"{w}-{i}" for w in range(4) for i in range(25)}
    assert update_json(path, {"first": 1})["first"] == 1  # a later value replaces an earlier one
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary file left behind
