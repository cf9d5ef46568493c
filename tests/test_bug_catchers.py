"""Tests for bugs the suite let through when they were planted (issue 11, "Tests that let bugs through").

Each test compares against a naive reference on inputs where the planted bug changes the answer:
a non-square grid (swapped height/width), an accuracy that must be 1 (accuracy stuck at 0), the
online probe's logged accuracy recomputed by hand, and fine-tuning that must learn.
"""

import pytest
import pytorch_lightning as pl
import torch

from selfsup.data.datamodule import SelfSupDataModule
from selfsup.eval.online import FrozenEncoder, OnlineLinearProbe
from selfsup.quiet import quiet_lightning
from selfsup.ssl.backbone import Backbone
from selfsup.ssl.losses import GridInfoNCE
from selfsup.ssl.module import ImageEncoder
from tests.test_cpc import _naive_grid_info_nce

DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def _naive_accuracy(preds, targets, offsets, directions):
    """Share of valid predictions whose positive logit is the largest (ties count as correct)."""
    _, _, b_n, gh, gw, t = preds.shape
    cands = targets.reshape(b_n * gh * gw, t)
    hits = total = 0
    for r, (dr, dc) in enumerate(directions):
        for kk, k in enumerate(offsets):
            for b in range(b_n):
                for i in range(gh):
                    for j in range(gw):
                        ti, tj = i + k * dr, j + k * dc
                        if 0 <= ti < gh and 0 <= tj < gw:
                            logits = cands @ preds[r, kk, b, i, j]
                            hits += bool(logits[b * gh * gw + ti * gw + tj] >= logits.max())
                            total += 1
    return hits / total


@pytest.mark.parametrize("gh,gw", [(3, 5), (5, 3)])
def test_grid_info_nce_on_a_non_square_grid_matches_the_naive_reference(gh, gw):
    g = torch.Generator().manual_seed(1)
    offsets = (1, 2)
    preds = torch.randn(4, 2, 2, gh, gw, 6, generator=g, dtype=torch.float64)
    targets = torch.randn(2, gh, gw, 6, generator=g, dtype=torch.float64)
    loss, acc = GridInfoNCE(offsets, DIRECTIONS, chunk_size=7)(preds, targets)
    torch.testing.assert_close(loss, _naive_grid_info_nce(preds, targets, offsets, DIRECTIONS))
    assert float(acc) == pytest.approx(_naive_accuracy(preds, targets, offsets, DIRECTIONS))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_grid_info_nce_accuracy_is_one_when_every_prediction_is_its_target(chunk_size):
    gh, gw, b = 3, 4, 2
    targets = torch.eye(b * gh * gw, dtype=torch.float64).reshape(b, gh, gw, b * gh * gw)  # orthonormal
    preds = torch.zeros(1, 1, b, gh, gw, b * gh * gw, dtype=torch.float64)
    preds[0, 0, :, :-1] = 20 * targets[:, 1:]  # from row i, predict the target at row i + 1 exactly
    loss, acc = GridInfoNCE((1,), ((1, 0),), chunk_size=chunk_size)(preds, targets)
    assert float(acc) == 1.0 and float(loss) < 1e-3
    _, acc_random = GridInfoNCE((1,), ((1, 0),))(torch.randn_like(preds), targets)
    assert float(acc_random) < 1.0


def test_cpc_reports_the_accuracy_of_its_own_predictions():
    """cpc_acc is the naive top-1 of the step's predictions (not 0, not a constant)."""
    from selfsup.ssl.cpc import CPC

    torch.manual_seed(0)
    model = CPC(backbone="convnet_small", image_size=16).eval()
    seen = {}
    predict = model.task.predict

    def spy(z, offsets=None):
        seen["preds"], seen["targets"] = (t.detach().double() for t in predict(z, offsets))
        return predict(z, offsets)

    model.task.predict = spy
    with torch.no_grad():
        model.task.predictors.mul_(50)  # confident, informative predictions: many rows right, some wrong
        out = model.loss((torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.zeros(4, dtype=torch.long)))
    crit = model.task.criterion(model.geometry.offsets)
    expected = _naive_accuracy(seen["preds"], seen["targets"], crit.offsets, crit.directions)
    assert float(out["cpc_acc"]) == pytest.approx(expected, abs=1e-6)


def test_val_online_top1_is_the_probes_real_accuracy(tmp_path):
    torch.manual_seed(0)
    dm = SelfSupDataModule("digits", batch_size=256, image_size=8)
    dm.setup("fit")
    encoder = ImageEncoder(Backbone("convnet_small"))
    probe = OnlineLinearProbe(dm.num_classes, lr=1e-2)
    with quiet_lightning():
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, callbacks=[probe], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, num_sanity_val_steps=0, accelerator="cpu")
        trainer.fit(FrozenEncoder(encoder), datamodule=dm)
    encoder.eval()
    probe.head.eval()
    images, labels = dm.val_set.__getitems__(list(range(len(dm.val_set))))
    with torch.no_grad():
        logits = probe.head(encoder(images))
    top1 = 100 * (logits.argmax(1) == labels).double().mean().item()
    top5 = 100 * (logits.topk(5, 1).indices == labels[:, None]).any(1).double().mean().item()
    assert probe.last_top1 == pytest.approx(top1, abs=1e-4)
    assert float(trainer.callback_metrics["val/online_top1"]) == pytest.approx(top1, abs=1e-4)
    assert probe.last_top5 == pytest.approx(top5, abs=1e-4)
    assert 0 < top1 < 100  # neither a constant 0 nor 100 could pass the equality above by accident


def test_train_classifier_learns_beyond_a_few_steps():
    from selfsup.eval.finetune import train_classifier

    torch.manual_seed(0)
    dm = SelfSupDataModule("digits", batch_size=256, image_size=8)
    dm.setup("fit")
    train, test = dm.train_set, dm.val_set
    import numpy as np

    encoder = ImageEncoder(Backbone("convnet_small"))
    before = [p.detach().clone() for p in encoder.parameters()]
    full = train_classifier(encoder, train, test, np.arange(len(train)), 10, steps=15, batch_size=64,
                            lr=3e-3, accelerator="cpu")
    assert full["top1"] > 50 and full["top5"] >= full["top1"]  # chance is 10%; 30 steps reach ~96%
    # the encoder passed in is not trained in place
    assert all(torch.equal(a, p) for a, p in zip(before, encoder.parameters(), strict=True))
