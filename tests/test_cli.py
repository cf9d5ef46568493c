"""End-to-end: the `selfsup` command in a subprocess, as a user runs it."""

import csv
import json
import re

import pytest
import torch
import yaml

import selfsup
from tests.conftest import run_cli, run_cli_here

pytestmark = pytest.mark.slow
FAST = ["--backbone", "convnet_small", "--data", "digits", "--image-size", "16", "--batch-size", "128"]


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_pretrain_resume_and_export(tmp_path):
    r = run_cli("pretrain", "--method", "rotation", *FAST, "--max-epochs", "1", "--name", "t", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    for f in ("config.yaml", "metrics.csv", "metrics.json", "checkpoints/last.ckpt",
              "export/encoder.safetensors", "export/config.json"):
        assert (run / f).is_file(), f
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"] == "rotation" and cfg["model"]["backbone"] == "convnet_small"
    assert cfg["data"]["image_size"] == 16 and cfg["trainer"]["max_epochs"] == 1
    assert "val/online_top1" in json.loads((run / "metrics.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    probe_state = ckpt["callbacks"]["OnlineLinearProbe"]
    assert set(probe_state) == {"head", "optimizer"}
    steps_before = len([r for r in _rows(run / "metrics.csv") if r.get("train/loss")])

    # the same name without --resume refuses to overwrite
    r = run_cli("pretrain", *FAST, "--max-epochs", "1", "--name", "t", cwd=tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr

    r = run_cli("pretrain", "--resume", "--name", "t", "--max-epochs", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt2 = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt2["epoch"] == 1 and ckpt2["global_step"] == 2 * ckpt["global_step"]
    # the probe went on from its saved state: Adam's step count kept growing
    adam_steps = [s["step"] for s in ckpt2["callbacks"]["OnlineLinearProbe"]["optimizer"]["state"].values()]
    assert all(float(s) == 2 * ckpt["global_step"] for s in adam_steps)
    rows = _rows(run / "metrics.csv")
    assert len([r for r in rows if r.get("train/loss")]) > steps_before  # nothing lost on resume
    assert sorted(run.glob("metrics.part*.csv")) == []

    # the exported encoder loads and encodes
    enc = selfsup.load_encoder(run / "export")
    assert enc(torch.rand(2, 3, 16, 16)).shape == (2, 128)


def test_demo_runs_and_prints_the_table(tmp_path):
    r = run_cli("demo", "--epochs", "2", "--seeds", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "random init" in r.stdout and "pixels" in r.stdout and "Label efficiency" in r.stdout
    assert "raw pixels already classify" in " ".join(r.stdout.split())  # the caveat under the table
    run = next((tmp_path / "runs").glob("*/demo.json")).parent
    rows = json.loads((run / "demo.json").read_text())
    assert len(rows) == 3 and sum(name.startswith("random init") for name in rows) == 1
    for row in rows.values():
        assert 0 <= row["linear_top1"] <= 100 and 0 <= row["knn_top1"] <= 100
    assert rows["pixels"]["online_top1"] is None
    assert (run / "eval" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rel = run.relative_to(tmp_path)
    assert r.stdout.strip().splitlines()[-1] == (
        f"run directory: {rel} (encoder: {rel}/export, table: {rel}/demo.json, sweep: {rel}/eval/sweep.json, "
        f"plot: {rel}/eval/sweep.png)")


@pytest.mark.parametrize(
    "args,message",
    [
        (["pretrain", "--data", "/nonexistent/folder", "--max-epochs", "1"], "/nonexistent/folder"),
        (["pretrain", "--backbone", "resnet_typo", "--max-epochs", "1"], "unknown backbone 'resnet_typo'"),
        (["pretrain", "--resume", "--name", "nope"], "cannot resume"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_misspelt_flag_is_rejected(tmp_path):
    r = run_cli("pretrain", "--lrr", "0.1", cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments: --lrr" in r.stderr


def test_method_help_lists_method_options(tmp_path):
    r = run_cli("pretrain", "--method", "rotation", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--head-hidden" in r.stdout and "--max-epochs" in r.stdout


# Every method's run through the CLI, export round trip and one-step check: tests/test_registry.py.


def test_cpc_follows_the_data_image_size(tmp_path):
    # no --image-size: the digits' default size reaches CPC's grid without clashing with the data's hparams
    r = run_cli("pretrain", "--method", "cpc", "--backbone", "convnet_small", "--fast-dev-run", "1", "--name", "c",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "runs" / "c" / "config.yaml").read_text())
    assert cfg["model"]["image_size"] == 32 and cfg["data"]["image_size"] is None


@pytest.mark.parametrize("args, message", [
    (["knn", "--k", "0"], "--k: must be a positive integer, got '0'"),
    (["knn", "--temperature", "-1"], "--temperature: must be positive"),
    (["sweep", "--ks", "1,x"], "--ks: expected comma-separated whole numbers or 'all', got '1,x'"),
    (["sweep", "--percents", "0"], "--percents: percents must be in (0, 100]"),
])
def test_eval_options_fail_in_one_line_before_any_work(args, message, tmp_path, capsys):
    from selfsup import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--random-init", "convnet_small", "--data", "digits", "--output", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "_int_list" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_backbone_and_patch_help_say_what_they_take(capsys):
    from selfsup import cli

    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--method", "cpc", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "cifar_resnet18" in out and "timm" in out
    assert "--patch-size INT patch side in pixels" in out and "--patch-stride INT step between patches" in out


def test_pretrain_output_is_selfsups_own_unless_verbose(tmp_path, monkeypatch, capfd):
    from selfsup import cli
    from selfsup.train import RUN_DIR_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RUN_DIR_ENV, "")
    base = ["pretrain", "--backbone", "convnet_small", "--data", "digits", "--image-size", "8", "--max-steps", "1",
            "--log-every-n-steps", "1", "--no-online-probe"]
    assert cli.main([*base, "--name", "quiet"]) == 0
    out = "".join(capfd.readouterr())
    assert "run written to" in out
    for chatter in ("GPU available", "TPU available", "Total FLOPs", "Tip:", "stepping batches"):
        assert chatter not in out
    assert cli.main([*base, "--name", "loud", "--verbose"]) == 0
    out = "".join(capfd.readouterr())
    assert "Total params" in out  # the model summary (Lightning's info lines go to logging, captured by pytest)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got '0'"),
    (["--seeds", "0"], "argument --seeds: must be a positive integer, got '0'"),
    (["--seeds", "-2"], "argument --seeds: must be a positive integer, got '-2'"),
    (["--epochs", "1.5"], "argument --epochs: expected a whole number, got '1.5'"),
])
def test_demo_counts_fail_in_one_line_before_any_work(args, message, tmp_path, capsys):
    from selfsup import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *args, "--output", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_run_stopped_by_max_time_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from selfsup import cli
    from selfsup.train import RUN_DIR_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RUN_DIR_ENV, "")
    base = ["pretrain", "--backbone", "convnet_small", "--image-size", "8", "--no-online-probe", "--name", "t"]
    assert cli.main([*base, "--max-epochs", "500", "--max-time", "1s"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "run written to" in ln]
    assert len(lines) == 1
    m = re.fullmatch(r"stopped at the time limit \(--max-time 00:00:00:01\) after (\d+) steps; run written to "
                     r"runs/t \(encoder of that step in runs/t/export\); continue it with: "
                     r"selfsup pretrain --resume --name t", lines[0])
    assert m, lines[0]
    last = torch.load(tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt", weights_only=False)
    assert 1 <= int(m.group(1)) == last["global_step"] < 500 * 6


def test_resume_says_which_checkpoint_it_continues_from(tmp_path, monkeypatch, capsys):
    from selfsup import cli
    from selfsup.train import RUN_DIR_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RUN_DIR_ENV, "")
    base = ["pretrain", "--backbone", "convnet_small", "--image-size", "8", "--no-online-probe", "--name", "r"]
    assert cli.main([*base, "--max-steps", "2"]) == 0
    assert "resuming" not in capsys.readouterr().err
    assert cli.main([*base, "--resume", "--max-steps", "3"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "resuming" in ln]
    assert len(err) == 1 and re.fullmatch(
        r"selfsup: resuming from runs/r/checkpoints/\S+\.ckpt \(epoch 0, step 2\)", err[0]), err


def test_skipped_images_are_one_whole_warning_line_and_the_hint_names_the_flag(tmp_path):
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "d" / split / c / f"{i}.png")
    (tmp_path / "d" / "train" / "a" / "bad.png").write_bytes(b"not an image")
    args = ["pretrain", "--backbone", "convnet_small", "--data", "d", "--batch-size", "4", "--max-steps", "1",
            "--no-online-probe"]
    r = run_cli(*args, "--name", "s", "--skip-bad-images", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    bad = tmp_path / "d" / "train" / "a" / "bad.png"
    lines = [ln for ln in r.stderr.splitlines() if "bad" in ln]
    assert lines == [f"selfsup: warning: skipped 1 bad file(s) in {tmp_path / 'd' / 'train'} (first: {bad})"], r.stderr
    r = run_cli_here(*args, "--name", "t", cwd=tmp_path)
    assert r.returncode == 2 and "pass --skip-bad-images" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_pretrain_help_shows_the_defaults_a_run_actually_uses(capsys):
    import argparse

    from selfsup import cli
    from selfsup.train import resolve_config

    p = cli.build_pretrain_parser(argparse.ArgumentParser().add_subparsers(), "rotation")
    helps = {a.dest: a.help for a in p._actions}
    used = resolve_config({})  # no flag, no --config: what the run trains with
    for section, flags in (("trainer", cli.TRAINER_FLAGS), ("data", ["batch_size"])):
        for name in flags:
            value = used[section][name]
            assert helps[name].endswith(f"(default: {'none' if value is None else value})"), (name, helps[name])
    for name, value in used["model"].items():
        assert helps[name].endswith(f"(default: {value!r})"), (name, helps[name])
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "epochs to train (default: 100)" in out and "images per batch per device (default: 256)" in out


def test_demo_final_line_gives_every_path_in_one_form(tmp_path, monkeypatch):
    from selfsup.demo import final_line

    monkeypatch.chdir(tmp_path)
    line = final_line("runs/d", tmp_path / "runs" / "d" / "eval" / "sweep.json", "runs/d/eval/sweep.png")
    assert line == ("run directory: runs/d (encoder: runs/d/export, table: runs/d/demo.json, "
                    "sweep: runs/d/eval/sweep.json, plot: runs/d/eval/sweep.png)")
    out = tmp_path.parent / "elsewhere"  # outside the working directory: absolute, all of them
    line = final_line(out, out / "eval" / "sweep.json", out / "eval" / "sweep.png")
    assert line == (f"run directory: {out} (encoder: {out / 'export'}, table: {out / 'demo.json'}, "
                    f"sweep: {out / 'eval' / 'sweep.json'}, plot: {out / 'eval' / 'sweep.png'})")
