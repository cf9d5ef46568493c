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
