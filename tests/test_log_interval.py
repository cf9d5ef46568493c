"""A small dataset still gets training curves (logging at most one epoch apart) and a short run still validates."""

import csv

import pytest

from selfsup.train import log_interval, pretrain


def test_log_interval_is_capped_at_one_epoch():
    assert log_interval(10, n_train=400, global_batch=64) == 6  # 6 steps an epoch (drop_last)
    assert log_interval(10, n_train=50_000, global_batch=64) == 10  # a big dataset keeps the setting
    assert log_interval(10, n_train=400, global_batch=32 * 2) == 6  # 2 ranks of 32
    assert log_interval(10, n_train=400, global_batch=64, accumulate=3) == 2
    assert log_interval(10, n_train=10, global_batch=64) == 1
    assert log_interval(0, n_train=400, global_batch=64) == 0  # logging off stays off


@pytest.mark.slow
def test_tiny_run_logs_train_loss_every_epoch(tmp_path):
    # digits: 1437 training images at batch 512 -> 2 steps an epoch, under the default interval of 10
    cfg = {"method": "rotation", "output": str(tmp_path), "name": "tiny", "online_probe": False,
           "model": {"backbone": "convnet_small"}, "data": {"image_size": 8, "batch_size": 512},
           "trainer": {"max_epochs": 3}}
    run = pretrain(cfg).run_dir
    with (run / "metrics.csv").open(newline="") as f:
        losses = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) >= 3, losses


def test_final_validation_batch_only_when_steps_end_inside_the_first_epoch():
    from selfsup.train import final_validation_batch

    assert final_validation_batch(3, n_train=1437, global_batch=64) == 3  # 22 batches an epoch
    assert final_validation_batch(3, n_train=1437, global_batch=64, accumulate=2) == 6  # counted in batches
    assert final_validation_batch(22, n_train=1437, global_batch=64) is None  # the epoch's end validates
    assert final_validation_batch(-1, n_train=1437, global_batch=64) is None  # no step limit


@pytest.mark.slow
def test_a_run_shorter_than_an_epoch_still_reports_held_out_bits_per_dim(tmp_path):
    # 2 steps of 22 an epoch: without a final validation the VAE would end with no val/bits_per_dim
    cfg = {"method": "vae", "output": str(tmp_path), "name": "short", "online_probe": False,
           "model": {"backbone": "convnet_small"}, "data": {"image_size": 8, "batch_size": 64},
           "trainer": {"max_epochs": 1, "max_steps": 2}}
    result = pretrain(cfg)
    assert result.metrics["val/bits_per_dim"] > 0
    assert "val/bits_per_dim" in (result.run_dir / "metrics.json").read_text()


def test_final_validation_batch_counts_a_gans_two_optimiser_steps_per_batch():
    from selfsup.train import final_validation_batch

    # --max-steps 6 on a GAN is 3 batches (D's step and G's step each): validate after batch 3, not 6
    assert final_validation_batch(6, n_train=1437, global_batch=64, steps_per_batch=2) == 3
    assert final_validation_batch(7, n_train=1437, global_batch=64, steps_per_batch=2) == 4  # the last, partial
    assert final_validation_batch(44, n_train=1437, global_batch=64, steps_per_batch=2) is None  # a full epoch
