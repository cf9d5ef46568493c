"""Small things a new user hit: top-5 of few classes, a mismatched image size, the demo's pointer."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from selfsup.errors import ConfigError
from selfsup.eval import harness
from selfsup.eval.features import Features, extract_features


def _features(n, d, classes, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = (rng.normal(size=(n, d)) + 3 * np.eye(classes, d)[y]).astype(np.float32)
    return Features(x, y, Path(f"f{seed}.safetensors"), {"encoder": "h"})


def test_top5_is_left_out_for_five_classes_or_fewer(capsys):
    for classes, shown in ((3, False), (7, True)):
        pair = (_features(60, 8, classes, 0), _features(30, 8, classes, 1))
        ev = harness.EvalData("toy", SimpleNamespace(classes=list(range(classes))), SimpleNamespace(), {"enc": pair})
        rows = harness.evaluate(ev, "knn", k=5, progress=False)
        assert (rows["enc"]["top5"] is not None) == shown
    from selfsup.eval.report import plot_sweep

    with pytest.raises(ConfigError, match="top-5 of 3 classes"):
        plot_sweep({"budgets": [], "results": {}, "num_classes": 3}, "x.png", metric="top5")


def test_page_table_has_no_top5_column_without_top5():
    from selfsup.eval.page import RunSummary, _table

    run = RunSummary("r", Path("r"), "", rows={"enc": {"linear": 90.0, "linear5": None, "knn": 80.0, "dim": 8}})
    assert "top-5" not in _table(run)
    run.rows["enc"]["linear5"] = 99.0
    assert "top-5" in _table(run)


def test_an_encoder_given_images_of_another_size_warns(tmp_path):
    from selfsup.ssl.backbone import Backbone
    from selfsup.ssl.module import ImageEncoder

    enc = ImageEncoder(Backbone("convnet_small")).eval()
    enc.config = {"data": {"data": "cifar10:/data/cifar10", "image_size": 32}}
    with pytest.warns(UserWarning, match="8 px images, the encoder was trained on 32 px"):
        extract_features(enc, "digits", image_size=8, cache_dir=tmp_path, progress=False)
    enc.config = {"data": {"data": "digits", "image_size": 8}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run's own data at its own size: no warning
        extract_features(enc, "digits", cache_dir=tmp_path, progress=False)


def test_demo_points_to_the_readme_results():
    from selfsup.demo import DIGITS_CAVEAT

    assert "README's Results" in DIGITS_CAVEAT
