"""Caches keyed by content, image size not taken from one file, killed builds cleaned up (issue 11, 2/3/8)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.datasets import load_dataset
from selfsup.eval.features import extract_features
from selfsup.pretext.rotation import Rotation


def _folder(root, colour_of, sizes=None):
    for c in ("a", "b"):
        for i in range(4):
            path = root / "train" / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            side = (sizes or {}).get((c, i), 8)
            g = np.random.default_rng(colour_of(c, i))
            Image.fromarray(g.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return root


def test_replaced_images_are_a_feature_cache_miss(tmp_path):
    root = _folder(tmp_path / "data", lambda c, i: hash((c, i)) % 1000)
    torch.manual_seed(0)
    enc = Rotation(backbone="convnet_small").encoder().eval()
    kw = {"cache_dir": tmp_path / "features", "progress": False, "accelerator": "cpu"}
    before = extract_features(enc, str(root), **kw)
    x_before = np.array(before.x)
    _folder(root, lambda c, i: 5000 + i)  # same names, same count, new pixels
    after = extract_features(enc, str(root), **kw)
    assert after.path != before.path
    assert not np.allclose(np.array(after.x), x_before)
    # and the same images again are a hit: nothing is re-extracted
    again = extract_features(enc, str(root), **kw)
    assert again.path == after.path


def test_image_size_is_the_common_one_not_the_first_files(tmp_path):
    root = _folder(tmp_path / "data", lambda c, i: i, sizes={("a", 0): 3})  # a/0.png sorts first and is tiny
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(str(root), cache_dir=tmp_path / "cache")
    assert ds.image_size == 8
    text = " ".join(str(w.message) for w in caught)
    assert "different sizes" in text and "3px x1" in text and "8px x7" in text and "using 8px" in text


def test_a_killed_decode_leaves_nothing_the_next_run_keeps(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    leak = cache / f"data-train-8px-0123.images.npy.tmp-{dead}"
    leak.write_bytes(b"\0" * 1000)
    root = _folder(tmp_path / "data", lambda c, i: i)
    load_dataset(str(root), cache_dir=cache)
    assert not leak.exists()
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("spec", ["digits"])
def test_every_dataset_has_a_content_fingerprint(spec):
    a, b = load_dataset(spec, "train"), load_dataset(spec, "val")
    assert a.fingerprint and a.fingerprint != b.fingerprint
