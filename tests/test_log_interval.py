"""A small dataset still gets training curves: the logging interval is at most one epoch's steps."""

import csv

from selfsup.train import log_interval, pretrain


def test_log_interval_is_capped_at_one_epoch():
    assert log_interval(10, n_train=400, global_batch=64) == 6  # 6 steps an epoch (drop_last)
    assert log_interval(10, n_train=50_000, global_batch=64) == 10  # a big dataset keeps the setting
    assert log_interval(10, n_train=400, global_batch=32 * 2) == 6  # 2 ranks of 32
    assert log_interval(10, n_train=400, global_batch=64, accumulate=3) == 2
    assert log_interval(10, n_train=10, global_batch=64) == 1
    assert log_interval(0, n_train=400, global_batch=64) == 0  # logging off stays off


def test_tiny_run_logs_train_loss_every_epoch(tmp_path):
    # digits: 1437 training images at batch 512 -> 2 steps an epoch, under the default interval of 10
    cfg = {"method": "rotation", "output": str(tmp_path), "name": "tiny", "online_probe": False,
           "model": {"backbone": "convnet_small"}, "data": {"image_size": 8, "batch_size": 512},
           "trainer": {"max_epochs": 3}}
    run = pretrain(cfg).run_dir
    with (run / "metrics.csv").open(newline="") as f:
        losses = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) >= 3, losses
