"""A NaN loss stops the run naming the step; the last good checkpoint survives (issue 11, "Divergence")."""

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from selfsup.checkpoint import load_checkpoint
from selfsup.errors import TrainingError
from selfsup.runs import LOCK_NAME
from selfsup.train import pretrain


class PoisonAt(Callback):
    """Make every weight of the backbone NaN just before the given step's batch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.backbone.parameters():
                    p.fill_(float("nan"))


def test_nan_loss_stops_at_its_step_and_keeps_the_good_checkpoint(tmp_path):
    cfg = {"method": "rotation", "output": str(tmp_path), "name": "nan", "checkpoint_every": 1,
           "online_probe": False, "model": {"backbone": "convnet_small"},
           "data": {"image_size": 8, "batch_size": 256}, "trainer": {"max_steps": 6}}
    with pytest.raises(TrainingError, match=r"diverged at step 3 .*the loss is nan") as err:
        pretrain(cfg, callbacks=[PoisonAt(3)])
    assert "\n" not in str(err.value)
    run = tmp_path / "nan"
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert ckpts, "the good checkpoints before the divergence are kept"
    for path in ckpts:
        ckpt = load_checkpoint(path)
        assert ckpt["global_step"] <= 3
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    assert not (run / "export").exists() and not (run / LOCK_NAME).exists()
