import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from selfsup.data.datasets import load_dataset
from selfsup.eval.features import extract_features
from selfsup.ssl.backbone import Backbone
from selfsup.ssl.module import ImageEncoder


def _encoder(seed=0):
    torch.manual_seed(seed)
    return ImageEncoder(Backbone("convnet_small")).eval()


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", "val", image_size=16)  # 360 images


def test_features_match_the_encoder_in_order_and_in_eval_mode(tmp_path, digits16):
    enc = _encoder()
    enc.train()  # extraction must switch to eval mode itself (batch norm uses running stats)
    feats = extract_features(enc, digits16, cache_dir=tmp_path, batch_size=64, progress=False)
    enc.eval()
    with torch.no_grad():
        expected = enc(digits16.__getitems__(list(range(len(digits16))))[0])
    assert feats.x.shape == (360, 128)
    np.testing.assert_allclose(feats.x, expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(feats.y, digits16.labels)
    # the streamed cache is a valid safetensors file for the official reader too
    from safetensors.numpy import load_file

    official = load_file(str(feats.path))
    np.testing.assert_array_equal(official["features"], feats.x)
    np.testing.assert_array_equal(official["labels"], feats.y)
    assert not list(tmp_path.glob("*.tmp*"))


def test_cache_hit_miss_and_invalidation(tmp_path, digits16):
    enc = _encoder()
    first = extract_features(enc, digits16, cache_dir=tmp_path, progress=False)
    mtime = first.path.stat().st_mtime_ns
    again = extract_features(enc, digits16, cache_dir=tmp_path, progress=False)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime  # hit: not rewritten
    assert isinstance(again.x, np.memmap)  # read memory-mapped
    with torch.no_grad():
        next(enc.parameters()).add_(0.5)  # changed weights -> a different cache file
    changed = extract_features(enc, digits16, cache_dir=tmp_path, progress=False)
    assert changed.path != first.path
    assert not np.allclose(changed.x, first.x)
    half = extract_features(enc, digits16, cache_dir=tmp_path, dtype="float16", progress=False)
    assert half.x.dtype == np.float16 and half.path != changed.path
    np.testing.assert_allclose(half.x.astype(np.float32), changed.x, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_ddp_extraction_with_two_processes_equals_single_process(tmp_path):
    """Two CPU processes on gloo give exactly the single-process features, in dataset order."""
    script = tmp_path / "ddp_extract.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np, torch
        from selfsup.data.datasets import load_dataset
        from selfsup.eval.features import extract_features
        from selfsup.ssl.backbone import Backbone
        from selfsup.ssl.module import ImageEncoder
        torch.manual_seed(0)
        enc = ImageEncoder(Backbone("convnet_small")).eval()
        data = load_dataset("digits", "val", image_size=16)
        f = extract_features(enc, data, cache_dir=r"{tmp_path / 'ddp'}", batch_size=50, accelerator="cpu",
                             devices=2, strategy="ddp", progress=False)
        np.save(r"{tmp_path / 'ddp.npy'}", np.asarray(f.x))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = extract_features(_encoder(), load_dataset("digits", "val", image_size=16), cache_dir=tmp_path / "one",
                              batch_size=50, progress=False)
    ddp = np.load(tmp_path / "ddp.npy")
    np.testing.assert_array_equal(ddp, np.asarray(single.x))


def _tiny_folder(root, n_per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{c}_{i}.png")


def test_sample_keys_and_fingerprint_do_not_depend_on_where_the_data_lives(tmp_path):
    from selfsup.eval.features import data_fingerprint, sample_keys

    _tiny_folder(tmp_path / "a" / "imgs")
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "imgs").rename(tmp_path / "b" / "moved")
    _tiny_folder(tmp_path / "a" / "imgs")  # the same images again, at the first place
    one = load_dataset(str(tmp_path / "a" / "imgs"), "train", cache_dir=tmp_path / "cache")
    two = load_dataset(str(tmp_path / "b" / "moved"), "train", cache_dir=tmp_path / "cache")
    keys = sample_keys(one)
    assert sorted(keys) == sorted(f"train/{c}/{c}_{i}.png" for c in ("cat", "dog") for i in range(3))
    assert sorted(sample_keys(two)) == sorted(keys)
    assert data_fingerprint(one, keys) == data_fingerprint(two, sample_keys(two))
    assert sample_keys(load_dataset("digits", "val", image_size=8)) is None


@pytest.mark.slow
def test_sweep_cli_with_a_subset_file(tmp_path):
    import json

    from tests.conftest import run_cli

    _tiny_folder(tmp_path / "imgs", n_per_class=4)
    (tmp_path / "list.txt").write_text("cat_1.png\ndog/dog_2.png\ncat_3.png\ndog_0.png\n")
    r = run_cli("sweep", "--random-init", "convnet_small", "--data", str(tmp_path / "imgs"), "--ks", "2",
                "--subset-file", str(tmp_path / "list.txt"), "--seeds", "1", "--methods", "knn", "--no-baselines",
                "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [b["name"] for b in res["budgets"]] == ["k=2", "file:list.txt"]
    assert res["budgets"][1]["n_labels"] == 4 and res["dataset"] == "folder"
    assert res["provenance"]["data"]["subsets_keyed_by"] == "relative image paths"


@pytest.mark.slow
def test_python_extraction_reuses_what_the_cli_cached(tmp_path):
    import selfsup
    from selfsup.train import pretrain
    from tests.conftest import run_cli

    cfg = {"model": {"backbone": "convnet_small"}, "data": {"data": "digits", "image_size": 16, "batch_size": 64},
           "trainer": {"max_steps": 1}, "output": str(tmp_path), "name": "r", "online_probe": False}
    run = pretrain(cfg).run_dir
    proc = run_cli("features", str(run), "--no-baselines", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cached = {p: p.stat().st_mtime_ns for p in (run / "features").glob("*.safetensors")}
    feats = selfsup.extract_features(selfsup.load_encoder(run), "digits", "train", progress=False)
    assert feats.path in cached and feats.path.stat().st_mtime_ns == cached[feats.path]  # read, not re-extracted
    assert feats.x.shape[0] == 1437


def test_extraction_removes_what_a_killed_extraction_left(tmp_path):
    import os
    import subprocess
    import sys

    import selfsup
    from selfsup.ssl.backbone import Backbone
    from selfsup.ssl.module import ImageEncoder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"abc.safetensors.tmp{dead.pid}"
    live = tmp_path / f"def.safetensors.tmp{os.getppid()}"  # a process that still runs: another writer
    for p in (stale, live):
        p.write_bytes(b"half-written")
    torch.manual_seed(0)
    enc = ImageEncoder(Backbone("convnet_small")).eval()
    feats = selfsup.extract_features(enc, "digits", "val", image_size=8, cache_dir=tmp_path, progress=False)
    assert not stale.exists() and live.exists()
    assert feats.path.parent == tmp_path and not list(tmp_path.glob(f"*.tmp{os.getpid()}"))


def test_extraction_bar_names_the_encoder_the_split_and_counts_images(tmp_path, digits16, capsys):
    enc = _encoder()
    enc.config = {"method": "rotation", "hparams": {"backbone": "convnet_small"}}  # as load_encoder sets it
    extract_features(enc, digits16, "val", cache_dir=tmp_path, batch_size=100)
    out = capsys.readouterr().out
    assert "extract rotation-convnet_small val (360 images)" in out
    assert "360/360" in out  # images, not Lightning's 4 batches
    assert "Predicting" not in out
    extract_features(enc, digits16, "val", cache_dir=tmp_path, refresh=True, progress=False)
    assert capsys.readouterr().out == ""


def test_harness_bars_name_each_encoder_it_extracts(tmp_path, capsys):
    from selfsup.eval import harness

    src = harness.resolve_source(random_init="convnet_small", output=str(tmp_path / "eval"))
    harness.prepare(src, data="digits", image_size=8, cache_dir=tmp_path / "features")
    out = capsys.readouterr().out
    for line in ("extract random-init convnet_small train (1,437 images)", "extract pixels val (360 images)"):
        assert line in out
