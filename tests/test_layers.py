"""Layer-wise linear evaluation: stage reading, ~9,000-dim pooling, one pass, per-layer caches, best layer."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.errors import ConfigError
from selfsup.eval.features import extract_features
from selfsup.eval.layers import LAST, plan_layers, pool_grid, read_stages, select_layers
from selfsup.ssl.backbone import Backbone
from selfsup.ssl.module import ImageEncoder
from tests.conftest import run_cli_here

NAMES = ["features.0", "features.1", "features.2", "features.3", "out"]


def test_select_layers_takes_all_last_indices_and_names_in_stage_order():
    assert select_layers("all", NAMES) == NAMES
    assert select_layers(None, NAMES) == select_layers("last", NAMES) == ["out"]
    assert select_layers("3,1", NAMES) == ["features.1", "features.3"]  # stage order, 0-based
    assert select_layers("out,features.2,2", NAMES) == ["features.2", "out"]  # each once
    for bad, message in (("9", "out of range"), ("layer7", "no such layer"), ("best", "only `selfsup sweep`"),
                         (",", "empty")):
        with pytest.raises(ConfigError, match=message):
            select_layers(bad, NAMES)


def test_pool_grid_gives_about_9000_dims_like_goyal_et_al():
    assert pool_grid(1024, 14, 14) == (3, 3)  # ResNet-50 res4: 9,216
    assert pool_grid(2048, 7, 7) == (2, 2)  # res5: 8,192
    assert pool_grid(256, 56, 56) == (6, 6)  # res2: 9,216
    assert pool_grid(128, 4, 4) == (4, 4)  # a map smaller than the target is kept whole


def test_image_encoder_stages_end_with_its_own_output():
    enc = ImageEncoder(Backbone("cifar_resnet18")).eval()
    x = torch.rand(2, 3, 16, 16)
    stages = read_stages(enc, x)
    assert list(stages) == ["act1", "layer1", "layer2", "layer3", "layer4", LAST]
    torch.testing.assert_close(stages[LAST], enc(x))
    assert list(read_stages(nn.Sequential(nn.Flatten()), x)) == [LAST]  # no forward_stages: one layer


class Counting(ImageEncoder):
    calls = 0

    def forward_stages(self, x):
        type(self).calls += 1
        return super().forward_stages(x)


def test_layers_are_read_in_one_pass_cached_per_layer_and_reused(tmp_path):
    torch.manual_seed(0)
    enc = Counting(Backbone("convnet_small")).eval()
    from selfsup.data.datasets import load_dataset

    data = load_dataset("digits", "train", image_size=8)
    plan = plan_layers(enc, tuple(data[0][0].shape), "all")
    Counting.calls = 0
    feats = extract_features(enc, data, layers="all", cache_dir=tmp_path, progress=False, batch_size=2048)
    assert Counting.calls == 2  # one blank image sizes the layers, then one pass of the one batch for all five
    assert list(feats) == NAMES
    assert {n: f.x.shape[1] for n, f in feats.items()} == plan.dims
    assert feats["features.1"].meta["pooling"] == "adaptive average pool to 4x4"  # 64 ch at 4x4: kept whole
    assert len({f.path for f in feats.values()}) == 5
    # the encoder's own output is the plain cache file, the features `selfsup probe` reads
    plain = extract_features(enc, data, cache_dir=tmp_path, progress=False)
    assert plain.path == feats[LAST].path
    np.testing.assert_array_equal(plain.x, feats[LAST].x)
    Counting.calls = 0
    again = extract_features(enc, data, layers="1,out", cache_dir=tmp_path, progress=False)
    assert Counting.calls == 1 and list(again) == ["features.1", "out"]  # all cached: the blank image only


def test_best_layer_is_chosen_on_held_out_training_labels_not_test():
    from selfsup.eval.harness import best_layer

    rows = {"layer2": {"top1": 90.0, "val_top1": 70.0}, "layer3": {"top1": 60.0, "val_top1": 80.0},
            "out": {"top1": 95.0, "val_top1": 75.0}}
    assert best_layer(rows) == "layer3"
    assert best_layer({"a": {"val_top1": 5.0}, "b": {"val_top1": 5.0}}) == "a"  # ties: the shallowest
    assert best_layer({"a": {"val_top1": None}, "out": {"val_top1": None}}) == "out"


def test_probe_layers_all_and_sweep_layers_best_through_the_cli(tmp_path):
    common = ("--random-init", "convnet_small", "--data", "digits", "--image-size", "8", "--output", str(tmp_path),
              "--no-baselines")
    r = run_cli_here("probe", *common, "--layers", "all", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "probe_layers.json").read_text())
    row = res["results"]["random-init convnet_small"]
    assert list(row["layers"]) == NAMES
    assert all({"top1", "top5", "weight_decay", "val_top1"} <= set(v) for v in row["layers"].values())
    best = max(row["layers"], key=lambda n: row["layers"][n]["val_top1"])
    assert row["best_layer"] == best and row["top1"] == row["layers"][best]["top1"]
    assert res["provenance"]["features"]["layers"]["features.0"]["pooling"] == "adaptive average pool to 8x8"
    assert res["provenance"]["features"]["dtype"] == "float16"  # --layers stores float16 unless told
    assert "[features.2]" in r.stdout and f"[{best}] *" in r.stdout  # one row per layer, the best marked

    r = run_cli_here("sweep", *common, "--layers", "best", "--ks", "2", "--seeds", "1", "--methods", "linear",
                     cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sweep = json.loads((tmp_path / "sweep_best-layer.json").read_text())
    chosen = sweep["best_layers"]["random-init convnet_small"]
    assert chosen["layer"] == best and chosen["val_top1"] == row["layers"][best]["val_top1"]
    assert sweep["layers"] == {"random-init convnet_small": [best]}
    assert list(sweep["results"]) == ["random-init convnet_small"]
    r = run_cli_here("probe", *common, "--layers", "best", cwd=tmp_path)
    assert r.returncode == 2 and "--layers best" in r.stderr and len(r.stderr.strip().splitlines()) == 1
