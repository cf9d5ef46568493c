"""What a resume owes (issue 21, items 10-12): a run killed after its last checkpoint is finished by
``--resume``; metrics.json and metrics.csv after any resume equal an uninterrupted run's; checkpoints stay few."""

import csv
import json
import subprocess
import sys

import pytest

from selfsup.train import pretrain
from tests.conftest import run_cli_here
from tests.test_resume import CONFIG, SAME_THREADS

pytestmark = pytest.mark.slow

# Runs CONFIG-like pretraining in a fresh process and sends it a real signal at a chosen moment.
SIGNALLED_RUN = """
import json, os, signal, sys
from pytorch_lightning.callbacks import Callback
from selfsup.cli import main
from selfsup.errors import SelfsupError
from selfsup.train import pretrain

cfg, when, sig = json.loads(sys.argv[1]), sys.argv[2], getattr(signal, sys.argv[3])

class SignalAt(Callback):
    sent = False

    def _send(self):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), sig)

    def on_train_end(self, trainer, *args):
        if when == "train_end":
            self._send()

    def on_validation_batch_end(self, trainer, *args):  # inside the first end-of-epoch validation
        if when == "validation":
            self._send()

    def on_train_batch_end(self, trainer, *args):
        if when.startswith("step=") and trainer.global_step == int(when[5:]):
            self._send()

try:
    pretrain(cfg, callbacks=[SignalAt()])
except SelfsupError as e:
    print(f"selfsup: error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))
"""


def _signalled(cfg, when, sig):
    return subprocess.run([sys.executable, "-c", SIGNALLED_RUN, json.dumps(cfg), when, sig], capture_output=True,
                          text=True, env=SAME_THREADS, timeout=600)


def _rows(run_dir):
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if v} for r in csv.DictReader(f)]


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("full")
    return pretrain({**CONFIG, "output": str(out), "name": "full"}).run_dir


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume(tmp_path, full):
    cfg = {**CONFIG, "output": str(tmp_path), "name": "cut"}
    r = _signalled(cfg, "train_end", "SIGKILL")
    assert r.returncode == -9, r.stderr[-3000:]
    run = tmp_path / "cut"
    assert not (run / "export").exists() and not (run / "metrics.json").exists()
    resumed = run_cli_here("pretrain", "--resume", "--name", "cut", "--output", str(tmp_path), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "had trained all its steps (10); writing its export and metrics.json" in resumed.stderr
    for name in ("encoder.safetensors", "config.json"):
        assert (run / "export" / name).read_bytes() == (full / "export" / name).read_bytes()
    assert _metrics(run) == _metrics(full)  # val/online_top1, val/online_top5, lr-*: all there
    assert _rows(run) == _rows(full)
    # finished now: a further resume has nothing to write and says so
    again = run_cli_here("pretrain", "--resume", "--name", "cut", "--output", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 2 and "trained no step" in again.stderr


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_validation_keeps_that_epochs_row(tmp_path, full, sig, code):
    cfg = {**CONFIG, "output": str(tmp_path), "name": "cut"}
    r = _signalled(cfg, "validation", sig)
    assert r.returncode == code, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("selfsup: error: ")
    pretrain(cfg, resume=True)
    assert _rows(tmp_path / "cut") == _rows(full)  # the epoch-0 validation row included
    assert _metrics(tmp_path / "cut") == _metrics(full)


def test_metrics_json_after_a_resume_that_does_not_validate_holds_the_last_validation(tmp_path):
    """Validation every 2 epochs of 3: the process resumed in epoch 2 validates nothing itself."""
    base = {**CONFIG, "trainer": {"max_epochs": 3, "log_every_n_steps": 1, "check_val_every_n_epoch": 2}}
    whole = pretrain({**base, "output": str(tmp_path), "name": "whole"}).run_dir
    assert "val/online_top1" in _metrics(whole)
    cfg = {**base, "output": str(tmp_path), "name": "cut"}
    r = _signalled(cfg, "step=13", "SIGKILL")  # killed one step after the step-12 checkpoint
    assert r.returncode == -9, r.stderr[-3000:]
    pretrain(cfg, resume=True)
    assert _metrics(tmp_path / "cut") == _metrics(whole)
    assert _rows(tmp_path / "cut") == _rows(whole)


def test_checkpoints_stay_bounded_over_resumes_and_signal_checkpoints_go_once_passed(tmp_path):
    from selfsup.checkpoint import find_resumable_checkpoint

    ckpts = tmp_path / "cut" / "checkpoints"
    cfg = {**CONFIG, "output": str(tmp_path), "name": "cut", "online_probe": False, "checkpoint_every": 1,
           "trainer": {"max_epochs": 1, "log_every_n_steps": 1}}
    r = _signalled(cfg, "step=3", "SIGTERM")
    assert r.returncode == 143, r.stderr[-3000:]
    assert (ckpts / "sigterm.ckpt").is_file()
    assert sorted(p.name for p in ckpts.iterdir()) == ["sigterm.ckpt", "step=2.ckpt", "step=3.ckpt"]
    for epochs in (1, 2, 3):  # each resume writes a checkpoint a step, and more files every epoch
        pretrain({**cfg, "trainer": {"max_epochs": epochs}}, resume=True)
        names = sorted(p.name for p in ckpts.iterdir())
        newest = 5 * epochs
        # last.ckpt and the two newest numbered ones (the default --keep-checkpoints 2); sigterm.ckpt passed
        assert names == [f"epoch={epochs - 1}-step={newest}.ckpt", "last.ckpt", f"step={newest}.ckpt"], names
        assert find_resumable_checkpoint(ckpts, say=lambda m: None)[1]["global_step"] == newest
    # --keep-checkpoints 0 keeps every one from now on; 1 keeps the newest numbered one only
    pretrain({**cfg, "trainer": {"max_epochs": 4}, "keep_checkpoints": 0}, resume=True)
    assert len(list(ckpts.glob("step=*.ckpt"))) == 6  # 15 (kept before) and 16..20
    r = run_cli_here("pretrain", "--resume", "--name", "cut", "--output", str(tmp_path), "--max-epochs", "5",
                     "--keep-checkpoints", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # the newest numbered one, and any other of that same newest step (never removed: --resume may need it)
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=4-step=25.ckpt", "last.ckpt", "step=25.ckpt"]
    bad = run_cli_here("pretrain", "--keep-checkpoints", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "keep_checkpoints must be >= 0" in bad.stderr
