"""Every registered method, now and future, gets the same three checks from this one file.

1. A fast run through the real CLI code path on the embedded digits (``selfsup pretrain ... --max-steps 2``)
   that writes a checkpoint and an export that loads.
2. A bit-exact export round trip: ``load_encoder(export)`` gives exactly the model's own features.
3. One optimiser step on a fixed batch lowers the method's own ``loss`` (random augmentations are
   replayed by reseeding, so both losses see the same views).

A new method needs no test code to get these; a method for which a check cannot hold by design says
why in :data:`NOT_APPLICABLE`.
"""

import sys

import pytest
import torch

import selfsup
from selfsup import cli
from selfsup.train import RUN_DIR_ENV, method_arguments
from tests.conftest import fixed_batch, perturb_

METHODS = sorted(selfsup.METHODS)
SIZE = 16
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    # ("gan", "one_step"): "an adversarial loss need not fall after one step",
}


def _small(method: str, **kw) -> dict:
    """Constructor arguments for a tiny model of ``method``."""
    args = method_arguments(method)
    out = {"backbone": "convnet_small", **kw}
    if "image_size" in args:
        out["image_size"] = SIZE
    return out


def _skip(method: str, check: str) -> None:
    if (method, check) in NOT_APPLICABLE:
        pytest.skip(NOT_APPLICABLE[(method, check)])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_fast_cli_run_on_digits(method, tmp_path, monkeypatch, capsys):
    _skip(method, "cli")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["selfsup"])
    monkeypatch.setenv(RUN_DIR_ENV, "")  # restored after the test: pretrain sets it for DDP ranks
    rc = cli.main(["pretrain", "--method", method, "--backbone", "convnet_small", "--data", "digits",
                   "--image-size", str(SIZE), "--batch-size", "32", "--max-steps", "2", "--name", "r",
                   "--log-every-n-steps", "1"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "runs" / "r"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    enc = selfsup.load_encoder(run / "export")
    with torch.no_grad():
        feats = enc(torch.rand(2, 3, SIZE, SIZE))
    assert feats.shape == (2, enc.num_features) and torch.isfinite(feats).all()


@pytest.mark.parametrize("method", METHODS)
def test_export_round_trip_is_bit_exact(method, tmp_path):
    _skip(method, "export")
    torch.manual_seed(0)
    model = selfsup.METHODS[method](**_small(method))
    perturb_(model)  # away from the seeded init, so a reload cannot match by accident
    model.eval()
    x = torch.rand(3, 3, SIZE, SIZE)
    expected = model.encode(x)
    model.export(tmp_path)
    enc = selfsup.load_encoder(tmp_path)
    assert enc.config["method"] == method and not enc.training
    with torch.no_grad():
        assert torch.equal(enc(x), expected)
        u8 = (x * 255).round().to(torch.uint8)
        torch.testing.assert_close(enc(u8), enc(u8.float() / 255))


@pytest.mark.parametrize("method", METHODS)
def test_one_step_lowers_the_loss(method):
    _skip(method, "one_step")
    torch.manual_seed(0)
    model = selfsup.METHODS[method](**_small(method, lr=1e-3, optimizer="adamw"))
    model.train()
    batch = fixed_batch(16, SIZE)
    opt = model.build_optimizer(model.parameters())
    torch.manual_seed(1)
    before = model.loss(batch)["loss"]
    opt.zero_grad()
    before.backward()
    opt.step()
    torch.manual_seed(1)  # the same random views again
    after = model.loss(batch)["loss"]
    assert torch.isfinite(before) and float(after.detach()) < float(before.detach())
