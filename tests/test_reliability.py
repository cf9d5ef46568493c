"""Issue 21 (reliability, round 3): crafted exports, full disks, bad files, start-up signals."""

import json

import pytest

from selfsup.errors import ConfigError
from tests.conftest import run_cli_here


@pytest.mark.parametrize("config, says", [
    ({"hparams": [1, 2]}, "hparams must be a mapping"),
    ({"hparams": "lr=0.1"}, "hparams must be a mapping"),
    ({"method": ["rotation"]}, "unknown method"),
    ({"method": 3}, "unknown method"),
])
def test_an_export_config_of_the_wrong_shape_is_one_line(tmp_path, config, says):
    """Item 8: ``"hparams": [1, 2]`` was ``TypeError: 'int' object is not iterable`` from build_method."""
    from selfsup import load_encoder

    export = tmp_path / "export"
    export.mkdir()
    base = {"format": 1, "method": "rotation", "hparams": {"backbone": "convnet_small"}, "num_features": 64}
    from selfsup.ssl.module import EXPORT_FORMAT

    (export / "config.json").write_text(json.dumps({**base, "format": EXPORT_FORMAT, **config}))
    (export / "encoder.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=says) as err:
        load_encoder(export)
    assert str(export / "config.json") in str(err.value)
    r = run_cli_here("probe", str(export), "--data", "digits", "--image-size", "8", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr


def _png_header_only(path, width, height):
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb's), with one tiny IDAT."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4))
                     + chunk(b"IEND", b""))


def _folder_with_a_bomb(root):
    from PIL import Image

    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "train" / cls / f"{i}.png")
    _png_header_only(root / "train" / "a" / "bomb.png", 30000, 30000)
    return root / "train" / "a" / "bomb.png"


def test_a_decompression_bomb_without_image_size_is_one_line_or_skipped(tmp_path):
    """Item 6: size inference read the bomb's header and raised PIL's DecompressionBombError."""
    from selfsup.data.datamodule import SelfSupDataModule

    bomb = _folder_with_a_bomb(tmp_path / "data")
    r = run_cli_here("pretrain", "--data", str(tmp_path / "data"), "--backbone", "convnet_small", "--max-steps", "1",
                     "--no-online-probe", "--batch-size", "4", "--output", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bomb) in lines[0] and "decompression bomb" in lines[0], r.stderr
    dm = SelfSupDataModule(data=str(tmp_path / "data"), batch_size=4, skip_bad=True)
    with pytest.warns(UserWarning):  # the skipped file is counted and named
        dm.setup("fit")
    assert dm.image_size == 8 and len(dm.train_set) + (len(dm.val_set) if dm.val_set is not None else 0) == 8


@pytest.fixture
def small_disk(tmp_path):
    """A real 20 MiB tmpfs (``mount -t tmpfs``, needs root); skipped with the reason where mounting fails."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill: {r.stderr.strip() or r.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` bytes free (a real file of zeros)."""
    import shutil

    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "ab") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_full_disk_during_report_is_one_line_and_leaves_no_temporary(small_disk, tmp_path):
    """Item 4: ``report -o`` said only "No space left on device" and left report.html.tmp behind."""
    from selfsup.train import pretrain

    run = pretrain({"method": "rotation", "model": {"backbone": "convnet_small"}, "data": {"image_size": 8},
                    "trainer": {"max_steps": 2}, "online_probe": False, "output": str(tmp_path / "runs"),
                    "name": "r"}).run_dir
    fill(small_disk, 0)
    out = small_disk / "report.html"
    r = run_cli_here("report", str(run), "-o", str(out), "--no-pictures", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot write {out}: no space left on the disk (needs about" in lines[0], r.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


CKPT_CFG = {"method": "rotation", "model": {"backbone": "convnet_small"}, "data": {"image_size": 8, "batch_size": 256},
            "trainer": {"max_epochs": 2, "log_every_n_steps": 100}, "online_probe": False, "checkpoint_every": 2,
            "name": "r"}


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_earlier_one(small_disk):
    """Item 3: a 23-frame ``RuntimeError: [enforce fail at inline_container.cc]`` traceback."""
    from pytorch_lightning.callbacks import Callback

    from selfsup.checkpoint import load_checkpoint
    from selfsup.errors import RunDirError
    from selfsup.train import pretrain

    class FillDiskAfterStep2(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 3:  # step=2.ckpt is written; step=4.ckpt (about 2 MiB) will not fit
                fill(small_disk, 256 * 1024)

    with pytest.raises(RunDirError) as err:
        pretrain({**CKPT_CFG, "output": str(small_disk)}, callbacks=[FillDiskAfterStep2()])
    ckpts = small_disk / "r" / "checkpoints"
    said = str(err.value)
    assert said.startswith(f"cannot write {ckpts / 'step=4.ckpt'}: no space left on the disk (needs about ")
    assert "\n" not in said and "enforce fail" not in said
    assert sorted(p.name for p in ckpts.iterdir()) == ["step=2.ckpt"]  # no temporary left, the earlier one kept
    assert load_checkpoint(ckpts / "step=2.ckpt")["global_step"] == 2


EXTRACT = """
import sys
from selfsup.errors import SelfsupError
from selfsup.eval.features import extract_features
from selfsup.ssl.backbone import Backbone
from selfsup.ssl.module import ImageEncoder

try:
    f = extract_features(ImageEncoder(Backbone("convnet_small")).eval(), "digits", image_size=8, cache_dir=sys.argv[1],
                         progress=False)
    print("rows", len(f.y))
except SelfsupError as e:
    print(f"selfsup: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_full_disk_during_feature_extraction_is_one_line_not_sigbus(small_disk, tmp_path):
    """Item 2: the cache writer filled a sparse memory map: a full disk killed the process with SIGBUS (135)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "SELFSUP_CACHE": str(tmp_path / "cache")}
    fill(small_disk, 64 * 1024)  # the train features (1437 x 64 float32, 368 KB) do not fit
    r = subprocess.run([sys.executable, "-c", EXTRACT, str(small_disk / "features")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left on the disk (needs about" in lines[0], r.stderr
    assert str(small_disk / "features") in lines[0]
    left = [p.name for p in small_disk.rglob("*") if p.is_file()]
    assert left == ["filler"], left  # nothing half-written
    (small_disk / "filler").unlink()  # with room, the same call works
    r = subprocess.run([sys.executable, "-c", EXTRACT, str(small_disk / "features")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and "rows 1437" in r.stdout, r.stderr[-2000:]


def test_a_damaged_feature_cache_is_rebuilt_with_a_note(tmp_path, capsys):
    """Item 5: a truncated cache file gave ``ValueError: mmap length is greater than file size``."""
    import numpy as np

    from selfsup.eval.features import check_cache_file, extract_features
    from selfsup.ssl.backbone import Backbone
    from selfsup.ssl.module import ImageEncoder

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    enc = ImageEncoder(Backbone("convnet_small")).eval()
    kw = dict(image_size=8, cache_dir=tmp_path, progress=False, split="val")
    first = extract_features(enc, "digits", **kw)
    x, y = np.array(first.x), np.array(first.y)
    (path,) = tmp_path.glob("*.safetensors")
    good = path.read_bytes()
    assert check_cache_file(path) is None
    damages = {
        "truncated": lambda b: b[:-100],
        "cut to its header": lambda b: b[:500],
        "label edited": lambda b: b[:-8] + (int.from_bytes(b[-8:], "little") + 1).to_bytes(8, "little"),
        "empty": lambda b: b"",
    }
    for what, damage in damages.items():
        path.write_bytes(damage(good))
        assert check_cache_file(path) is not None, what
        capsys.readouterr()
        again = extract_features(enc, "digits", **kw)
        err = capsys.readouterr().err
        assert f"selfsup: note: feature cache {path} is damaged (" in err and "extracting again" in err, what
        assert np.array_equal(np.array(again.x), x) and np.array_equal(np.array(again.y), y), what
        assert path.read_bytes() == good, what


def _folder_with_undecodable_names(root):
    """Real files whose names are not UTF-8: the data root, a class folder and half the images (Linux takes any
    bytes; Python shows them as lone surrogates, ``os.fsdecode(b'\\xff')`` == ``'\\udcff'``)."""
    import os

    from PIL import Image

    root = root / os.fsdecode(b"\xffdata")
    for split, n in (("train", 11), ("val", 3)):  # 22 training images: the report's kNN takes k=20
        for c, cls in enumerate((b"ok", b"\xff\xfecls")):
            folder = root / split / os.fsdecode(cls)
            folder.mkdir(parents=True)
            for i in range(n):
                name = b"\xff\xfeimg%d.png" % i if i % 2 == 0 else b"n%d.png" % i
                Image.new("RGB", (8, 8), (c * 200 + i * 9, i * 30, 0)).save(folder / os.fsdecode(name))
    return root


@pytest.mark.slow
def test_file_and_class_names_that_are_not_utf8_work_end_to_end(tmp_path):
    """Item 7: pretraining worked, then probe and sweep failed with UnicodeEncodeError (a name hashed with
    ``.encode()``), ``plot retrieval`` with matplotlib's TypeError, ``--subset-file`` with UnicodeDecodeError; a
    run under a folder that is not UTF-8 could not load its own export (safetensors takes UTF-8 paths only)."""
    import os

    from selfsup.train import pretrain

    data = _folder_with_undecodable_names(tmp_path)
    runs = tmp_path / os.fsdecode(b"\xferuns")
    run = pretrain({"method": "rotation", "model": {"backbone": "convnet_small"},
                    "data": {"data": str(data), "batch_size": 4}, "trainer": {"max_steps": 1}, "online_probe": False,
                    "output": str(runs), "name": "r"}).run_dir
    cls = os.fsdecode(b"\xff\xfecls")
    r = run_cli_here("probe", str(run), "--no-baselines", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / "eval" / "probe.json").read_text())
    assert res["provenance"]["data"]["n_train"] == 22 and len(res["provenance"]["data"]["fingerprint"]) == 64
    # the subset file is bytes: names as the disk has them, a bare name and relative paths, a BOM, CRLF
    subset = tmp_path / os.fsdecode(b"\xfesubset.txt")
    subset.write_bytes(b"\xef\xbb\xbfok/n1.png\r\n\xff\xfecls/n3.png\r\n# a comment\r\n"
                       b"ok/\xff\xfeimg2.png\r\n\xff\xfecls/\xff\xfeimg4.png\r\n")
    r = run_cli_here("sweep", str(run), "--ks", "1,2", "--seeds", "1", "--subset-file", str(subset), "--no-baselines",
                     cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads((run / "eval" / "sweep.json").read_text())
    budgets = {b["name"]: b for b in sweep["budgets"]}
    assert budgets[f"file:{subset.name}"]["n_labels"] == 4  # every listed name matched its own file
    assert [budgets["k=1"]["n_labels"], budgets["k=2"]["n_labels"]] == [2, 4]
    assert (run / "eval" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli_here("plot", str(run), "retrieval", "--queries", "2", "--k", "3", cwd=tmp_path)
    assert r.returncode == 0 and (run / "eval" / "retrieval.png").is_file(), r.stderr[-3000:]
    r = run_cli_here("plot", str(run), "embedding", cwd=tmp_path)
    assert r.returncode == 0 and (run / "eval" / "embedding.png").is_file(), r.stderr[-3000:]
    out = tmp_path / os.fsdecode(b"\xffreport.html")
    r = run_cli_here("report", str(run), "-o", str(out), "--no-pictures", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{run.parent.parent.name}/\ufffdruns/r" in out.read_text(encoding="utf-8")  # the run's folder, shown
    # a subset line naming no file says so in one line, the name shown with U+FFFD
    subset.write_bytes(b"\xff\xfecls/\xfe-missing.png\n")
    r = run_cli_here("sweep", str(run), "--ks", "1", "--seeds", "1", "--subset-file", str(subset), cwd=tmp_path)
    assert r.returncode == 2 and "'\ufffd\ufffdcls/\ufffd-missing.png'" in r.stderr, r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) == 1 and cls not in r.stderr


def test_name_hashes_are_the_disk_bytes_and_unchanged_for_utf8_names():
    """Subset draws hash each image's key: a UTF-8 name hashes as it always did (the same subsets as before),
    one that is not hashes as its bytes on the disk (``os.fsencode``)."""
    import hashlib
    import os

    from selfsup.eval.label_efficiency import _key_priority
    from selfsup.names import display_name, name_bytes

    def rank(raw: bytes) -> int:
        return int.from_bytes(hashlib.sha256(b"3\x1f" + raw).digest()[:8], "little")

    keys = ["cls/é.png", os.fsdecode(b"cls/\xff\xfeimg.png")]
    assert _key_priority(keys, 3).tolist() == [rank("cls/é.png".encode()), rank(b"cls/\xff\xfeimg.png")]
    assert name_bytes(keys[1]) == os.fsencode(keys[1]) and display_name(keys[1]) == "cls/\ufffd\ufffdimg.png"
    assert display_name("cls/é.png") == "cls/é.png"


def test_a_strict_stdout_prints_undecodable_paths_escaped(monkeypatch):
    """Under a UTF-8 locale stdout is strict: printing a run folder that is not UTF-8 failed with
    UnicodeEncodeError after the work was done. The CLI prints it escaped, as stderr does."""
    import io
    import os
    import sys

    from selfsup import cli

    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    with pytest.raises(UnicodeEncodeError):
        print(os.fsdecode(b"\xferuns"))
    cli._printable_names()
    print(os.fsdecode(b"\xferuns"))
    stdout.flush()
    assert raw.getvalue().endswith(b"\\udcferuns\n")


def _wait_for_torch_import(pid: int, timeout: float = 300.0) -> bool:
    """Whether process ``pid`` got to loading torch's shared libraries (it is importing torch: selfsup's own
    start-up handlers are in place by then) within ``timeout``; False if it ended first."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/maps") as f:
                if "torch" in f.read():
                    return True
        except OSError:
            return False
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("signame, code, words", [("SIGINT", 130, "interrupted by Ctrl-C"),
                                                   ("SIGTERM", 143, "stopped by SIGTERM")])
def test_a_signal_while_the_command_imports_is_one_line(tmp_path, signame, code, words):
    """Item 9: Ctrl-C while torch was imported printed a ``KeyboardInterrupt`` traceback; SIGTERM ended the
    process with no word. A real ``python -m selfsup pretrain``, signalled while it loads torch."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc to see when the process loads torch")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "selfsup", "pretrain", "--image-size", "8", "--max-steps", "5",
                          "--output", str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=tmp_path)
    try:
        assert _wait_for_torch_import(p.pid), p.communicate()
        p.send_signal(getattr(signal, signame))
        out, err = p.communicate(timeout=600)
    finally:
        p.kill()
    assert p.returncode == code, (p.returncode, err[-3000:])
    # one line: "... while starting (nothing was written)" when the signal comes while `import selfsup` runs,
    # or the command's own line when it comes in the lazy imports after parsing (still before anything is written)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"selfsup: {words}"), err[-3000:]
    assert not (tmp_path / "runs").exists()


# The CLI, sending itself a signal at a chosen moment (a real signal, from inside, so that the moment is exact).
SIGNALLED_CLI = """
import os, signal, sys
from pytorch_lightning.callbacks import Callback
import selfsup.train
from selfsup.data.datamodule import SelfSupDataModule
from selfsup.cli import main

when, signals = sys.argv[1], [getattr(signal, s) for s in sys.argv[2].split(",")]

def send():
    for s in signals:
        os.kill(os.getpid(), s)

if when == "data":  # before training: the data is being set up, no run folder yet
    setup = SelfSupDataModule.setup
    def setup_then_signal(self, stage=None):
        send()
        return setup(self, stage)
    SelfSupDataModule.setup = setup_then_signal

class SignalAt(Callback):
    def setup(self, trainer, *args, **kwargs):  # in the fit, before Lightning's own handlers and the first step
        if when == "fit":
            send()
    def on_train_batch_end(self, trainer, *args):
        if when == "step" and trainer.global_step == 3:
            send()

run = selfsup.train.pretrain
selfsup.train.pretrain = lambda cfg, resume=False: run(cfg, resume=resume, callbacks=[SignalAt()])
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("when, signals, code, says", [
    ("data", "SIGTERM", 143, "stopped by SIGTERM before training started (no run folder was made)"),
    ("fit", "SIGTERM", 143, "stopped by SIGTERM before the first step (nothing to resume, nothing kept in {run})"),
    ("data", "SIGINT,SIGINT", 130, "interrupted by Ctrl-C before training started (no run folder was made)"),
    ("step", "SIGINT,SIGINT", 130, "interrupted by a second Ctrl-C: stopped at once, this step unsaved (continue "
                                   "from its last checkpoint with: selfsup pretrain --resume --name r --output"),
])
def test_a_signal_before_training_or_a_second_ctrl_c_is_one_line(tmp_path, when, signals, code, says):
    """Item 9: SIGTERM before training ended the process with 143 and no word; a second Ctrl-C in training
    ended it with 1 and no word (Lightning turns ``KeyboardInterrupt`` into ``sys.exit(1)``)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-c", SIGNALLED_CLI, when, signals, "pretrain", "--image-size", "8",
                        "--batch-size", "256", "--max-steps", "6", "--checkpoint-every", "2", "--no-online-probe",
                        "--output", str(runs), "--name", "r"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("selfsup: error: " + says.format(run=runs / "r")), lines[0]
    if when == "step":  # stopped at once: the checkpoints of steps 2 (and the step-3 save that was cut) only
        assert sorted(p.name for p in (runs / "r" / "checkpoints").iterdir()) == ["step=2.ckpt"]
    else:
        assert not (runs / "r").exists()


def test_sigterm_during_an_evaluation_command_is_one_line_and_restores_the_handlers(tmp_path, monkeypatch):
    """A command outside training (here ``probe``, while it prepares): SIGTERM is one line and 143, Ctrl-C one
    line and 130; the handlers before the command are back afterwards (the CLI called in this process)."""
    import os
    import signal

    from selfsup.eval import harness

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum, code, words in ((signal.SIGTERM, 143, "stopped by SIGTERM"),
                                (signal.SIGINT, 130, "interrupted by Ctrl-C")):
        monkeypatch.setattr(harness, "prepare", lambda *a, signum=signum, **k: os.kill(os.getpid(), signum))
        r = run_cli_here("probe", "--random-init", "convnet_small", "--data", "digits", "--image-size", "8",
                         cwd=tmp_path)
        assert r.returncode == code and r.stderr == f"selfsup: {words}\n", (r.returncode, r.stderr)
        assert {s: signal.getsignal(s) for s in before} == before


def test_a_damaged_layer_cache_is_rebuilt_with_a_note(tmp_path, capsys):
    """Item 5 for ``--layers``: a layer's cache file was reused whatever it held; a truncated one failed in the
    memory map, an edited one was read as it was. Now each is checked like the main cache, and rebuilt."""
    import numpy as np

    from selfsup.eval.features import extract_features
    from selfsup.ssl.backbone import Backbone
    from selfsup.ssl.module import ImageEncoder

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    enc = ImageEncoder(Backbone("convnet_small")).eval()
    kw = dict(image_size=8, cache_dir=tmp_path, progress=False, split="val", layers="all")
    first = extract_features(enc, "digits", **kw)
    good = {name: (f.path, f.path.read_bytes(), np.array(f.x), np.array(f.y)) for name, f in first.items()}
    assert len(good) >= 3
    inner = next(name for name in good if name != "out")
    damages = {
        "truncated": lambda b: b[:-100],
        "label edited": lambda b: b[:-8] + (int.from_bytes(b[-8:], "little") + 1).to_bytes(8, "little"),
    }
    for layer in (inner, "out"):  # a pooled stage's own file, and the encoder's output (shared with probe)
        path, raw, x, y = good[layer]
        for what, damage in damages.items():
            path.write_bytes(damage(raw))
            capsys.readouterr()
            again = extract_features(enc, "digits", **kw)
            err = capsys.readouterr().err
            assert err.count("selfsup: note: feature cache") == 1, (layer, what, err)
            assert f"selfsup: note: feature cache {path} is damaged (" in err and "extracting again" in err
            assert np.array_equal(np.array(again[layer].x), x) and np.array_equal(np.array(again[layer].y), y)
            assert path.read_bytes() == raw, (layer, what)
            for other, (p, r, _, _) in good.items():  # the whole layers were kept, not extracted again
                assert p.read_bytes() == r, other


def test_forked_workers_end_quietly_under_the_commands_signal_handlers(tmp_path, capfd):
    """The decoding pool's workers are forked and inherit the command's handlers; ``pool.terminate()`` ends them
    with SIGTERM. With the command's SIGTERM handler they each printed a ``Terminated`` traceback (and a worker
    stuck in C would never have run it, leaving the pool's join waiting); forked, they take the defaults."""
    import signal

    import numpy as np
    from PIL import Image

    from selfsup.data.cache import _decode_files
    from selfsup.errors import DataError
    from selfsup.startup import command_signals

    (tmp_path / "bad.png").write_bytes(b"not a png")
    paths = [str(tmp_path / "bad.png")]  # the first chunk fails: the pool is ended while its workers are busy
    for i in range(2000):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(paths[-1])
    out = np.zeros((len(paths), 8, 8, 3), dtype=np.uint8)
    before = signal.getsignal(signal.SIGTERM)
    with command_signals():
        assert signal.getsignal(signal.SIGTERM) is not before
        with pytest.raises(DataError, match="bad.png"):
            _decode_files(paths, 8, out, skip_bad=False, workers=2)
        assert _decode_files(paths[1:65], 8, out[:64], skip_bad=False, workers=2) == []  # and a whole run
    assert signal.getsignal(signal.SIGTERM) is before
    assert out[:64, 0, 0, 0].tolist() == list(range(64))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Terminated" not in err, err


def test_sigterm_during_feature_extraction_leaves_no_half_filled_cache(tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C, or an error) in the middle of an extraction left the preallocated cache file, as
    large as the finished one, under a temporary name until a later extraction in that folder; now it goes
    at once. A real SIGTERM, sent by the process to itself at the third batch."""
    import os
    import signal

    from selfsup.eval import features

    check = features.check_features  # called once a batch by the single-device extraction loop
    calls = []

    def signalled(feats):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return check(feats)

    monkeypatch.setattr(features, "check_features", signalled)
    args = ("features", "--random-init", "convnet_small", "--data", "digits", "--image-size", "8", "--no-baselines",
            "--batch-size", "64", "--output", str(tmp_path / "out"))
    r = run_cli_here(*args, cwd=tmp_path)
    assert r.returncode == 143 and r.stderr == "selfsup: stopped by SIGTERM\n", (r.returncode, r.stderr[-2000:])
    assert len(calls) == 3  # stopped at the batch it was signalled in
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == []
    monkeypatch.setattr(features, "check_features", check)
    r = run_cli_here(*args, cwd=tmp_path)
    assert r.returncode == 0 and "train (1437, 128)" in r.stdout, r.stderr[-2000:]
