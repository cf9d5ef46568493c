"""Exact resume after SIGKILL mid-epoch; --max-time then --resume trains on; nothing-to-do resumes fail loudly."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from selfsup.checkpoint import find_resumable_checkpoint
from selfsup.errors import TrainingError
from selfsup.train import pretrain
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

CONFIG = {"method": "rotation", "checkpoint_every": 2, "model": {"backbone": "convnet_small"},
          "data": {"image_size": 8, "batch_size": 256}, "trainer": {"max_epochs": 2, "log_every_n_steps": 1}}

# digits: 1437 train images, 5 batches of 256 per epoch; killed at step 7 = batch 2 of epoch 1,
# one step after the step-6 checkpoint (so the resume starts mid-epoch, at batch 1 of epoch 1).
KILLED_RUN = """
import json, os, signal, sys
from pytorch_lightning.callbacks import Callback
from selfsup.train import pretrain

class SigkillAt(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 7:
            os.kill(os.getpid(), signal.SIGKILL)

pretrain(json.loads(sys.argv[1]), callbacks=[SigkillAt()])
"""


# The killed run is compared bit for bit with one trained in this process: same BLAS thread count
# (conftest pins 2; a subprocess would otherwise take OMP_NUM_THREADS or every core).
SAME_THREADS = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _losses(run_dir):
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_sigkilled_run_resumes_to_the_uninterrupted_loss_curve(tmp_path):
    import json

    full = pretrain({**CONFIG, "output": str(tmp_path), "name": "full"})
    cfg = {**CONFIG, "output": str(tmp_path), "name": "cut"}
    r = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(cfg)], capture_output=True, text=True,
                       env=SAME_THREADS, timeout=600)
    assert r.returncode == -9, r.stderr[-3000:]
    run = tmp_path / "cut"
    assert not (run / "export").exists()
    resumed = pretrain(cfg, resume=True)
    assert resumed.metrics["val/online_top1"] == full.metrics["val/online_top1"]
    expected = _losses(full.run_dir)
    assert len(expected) == 10
    assert _losses(run) == expected  # every step once, bit-identical losses: data order, RNG, optimiser

    # A finished run resumed without a larger limit trains nothing: an error, not a silent exit 0.
    with pytest.raises(TrainingError, match="trained no step"):
        pretrain(cfg, resume=True)
    assert _losses(run) == expected  # and no duplicated rows


def test_max_time_then_resume_trains_on(tmp_path):
    cfg = {**CONFIG, "output": str(tmp_path), "name": "t", "online_probe": False, "checkpoint_every": None,
           "trainer": {"max_epochs": 50, "max_time": "1s", "log_every_n_steps": 1}}
    first = pretrain(cfg)
    stopped = len(_losses(first.run_dir))
    assert 1 <= stopped < 250
    again = pretrain(cfg, resume=True)  # the limit counts afresh: it trains again, not zero steps
    steps = [int(s) for s, _ in _losses(again.run_dir)]
    assert len(steps) > stopped and steps == list(range(len(steps)))


# The CLI with a callback that sends this process SIGTERM after step 7 (mid-epoch, as a scheduler's
# pre-emption would); pretrain is wrapped so the CLI's own code path runs unchanged.
SIGTERMED_CLI = """
import os, signal, sys
from pytorch_lightning.callbacks import Callback
import selfsup.train
from selfsup.cli import main

class SigtermAt(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

run = selfsup.train.pretrain
selfsup.train.pretrain = lambda cfg, resume=False: run(cfg, resume=resume, callbacks=[SigtermAt()])
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_saves_the_step_exits_143_and_resume_continues_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["pretrain", "--method", "rotation", "--backbone", "convnet_small", "--image-size", "8",
            "--batch-size", "256", "--max-epochs", "2", "--log-every-n-steps", "1", "--output", str(tmp_path)]

    def cli(*extra, script=None):
        code = script or "import sys; from selfsup.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *args, *extra], capture_output=True, text=True, env=env,
                              timeout=600)

    full = cli("--name", "full")
    assert full.returncode == 0, full.stderr[-3000:]
    cut = cli("--name", "cut", script=SIGTERMED_CLI)
    assert cut.returncode == 143, cut.stderr[-3000:]
    last = cut.stderr.strip().splitlines()[-1]
    assert last.startswith("selfsup: error: stopped by SIGTERM (step 7 saved in ") and "--resume" in last
    run = tmp_path / "cut"
    assert not (run / "export").exists()
    path, ckpt = find_resumable_checkpoint(run / "checkpoints")  # the newest step: the one SIGTERM saved
    assert path.name == "sigterm.ckpt" and ckpt["global_step"] == 7
    resumed = cli("--name", "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = _losses(tmp_path / "full")
    assert len(expected) == 10 and _losses(run) == expected  # every step once, bit-identical


# The CLI with a callback that presses Ctrl-C (SIGINT to this process) after step 7.
INTERRUPTED_CLI = SIGTERMED_CLI.replace("signal.SIGTERM", "signal.SIGINT")


def test_ctrl_c_saves_the_step_exits_130_in_one_line_and_resume_continues(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["pretrain", "--method", "rotation", "--backbone", "convnet_small", "--image-size", "8",
            "--batch-size", "256", "--max-epochs", "2", "--log-every-n-steps", "1", "--no-online-probe",
            "--output", str(tmp_path), "--name", "cut"]
    cut = subprocess.run([sys.executable, "-c", INTERRUPTED_CLI, *args], capture_output=True, text=True, env=env,
                         timeout=600)
    assert cut.returncode == 130, cut.stderr[-3000:]
    assert "Traceback" not in cut.stderr
    lines = cut.stderr.strip().splitlines()
    assert len(lines) == 1, cut.stderr
    saved = tmp_path / "cut" / "checkpoints" / "interrupt.ckpt"
    assert lines[0] == (f"selfsup: error: interrupted by Ctrl-C (step 7 saved in {saved}); continue it with: "
                        f"selfsup pretrain --resume --name cut --output {tmp_path}")
    assert not (tmp_path / "cut" / "export").exists()
    path, ckpt = find_resumable_checkpoint(saved.parent)
    assert path == saved and ckpt["global_step"] == 7
    resumed = subprocess.run([sys.executable, "-m", "selfsup", *args, "--resume"], capture_output=True, text=True,
                             env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(s) for s, _ in _losses(tmp_path / "cut")] == list(range(10))  # every step once


def test_resume_with_new_limits_updates_config_yaml(tmp_path):
    import yaml

    cfg = {**CONFIG, "output": str(tmp_path), "name": "r", "online_probe": False, "checkpoint_every": None,
           "trainer": {"max_epochs": 1, "log_every_n_steps": 1}}
    pretrain(cfg)
    saved = tmp_path / "r" / "config.yaml"
    assert yaml.safe_load(saved.read_text())["trainer"]["max_epochs"] == 1
    again = pretrain({**cfg, "trainer": {"max_epochs": 2}, "checkpoint_every": 3}, resume=True)
    assert again.global_step == 10
    written = yaml.safe_load(saved.read_text())
    assert written["trainer"]["max_epochs"] == 2 and written["checkpoint_every"] == 3  # what the resumed run used
    assert written["model"]["backbone"] == "convnet_small" and written["trainer"]["log_every_n_steps"] == 1
    with pytest.raises(TrainingError, match="trained no step"):  # a resume that trains nothing changes nothing
        pretrain({**cfg, "trainer": {"max_epochs": 1}}, resume=True)
    assert yaml.safe_load(saved.read_text()) == written


# Ctrl-C while Lightning starts the fit, before the first step (Lightning itself would sys.exit(1)).
INTERRUPTED_AT_START_CLI = SIGTERMED_CLI.replace(
    "def on_train_batch_end(self, trainer, *args):\n        if trainer.global_step == 7:\n"
    "            os.kill(os.getpid(), signal.SIGTERM)",
    "def setup(self, trainer, *args, **kwargs):\n        os.kill(os.getpid(), signal.SIGINT)")


def test_ctrl_c_before_the_first_step_exits_130_and_leaves_no_run_dir(tmp_path):
    assert "signal.SIGINT" in INTERRUPTED_AT_START_CLI
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["pretrain", "--backbone", "convnet_small", "--image-size", "8", "--max-steps", "1", "--no-online-probe",
            "--output", str(tmp_path), "--name", "early"]
    r = subprocess.run([sys.executable, "-c", INTERRUPTED_AT_START_CLI, *args], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 130, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        f"selfsup: error: interrupted by Ctrl-C before the first step (nothing to resume, nothing kept in "
        f"{tmp_path / 'early'}; rerun the command to start again)"]
    assert not (tmp_path / "early").exists()
