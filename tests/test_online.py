import subprocess
import sys
import textwrap

import pytest
import torch

from selfsup.eval.online import OnlineLinearProbe


class _Module(torch.nn.Module):
    num_features = 6
    device = torch.device("cpu")


def test_state_survives_a_round_trip_even_before_setup():
    probe = OnlineLinearProbe(num_classes=3)
    probe.setup(None, _Module(), "fit")
    feats, labels = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = torch.nn.functional.cross_entropy(probe.head(feats), labels)
    loss.backward()
    probe.optimizer.step()
    state = probe.state_dict()

    restored = OnlineLinearProbe(num_classes=3)
    restored.load_state_dict(state)  # Lightning may restore before the head exists
    restored.setup(None, _Module(), "fit")
    for a, b in zip(probe.head.state_dict().values(), restored.head.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert restored.optimizer.state_dict()["state"][0]["step"] == 1


def test_heads_start_identical_on_every_rank():
    a, b = OnlineLinearProbe(4, seed=3), OnlineLinearProbe(4, seed=3)
    torch.manual_seed(1)
    a.setup(None, _Module(), "fit")
    torch.manual_seed(2)  # ranks have different global RNG states
    b.setup(None, _Module(), "fit")
    assert torch.equal(a.head[1].weight, b.head[1].weight)


@pytest.mark.slow
def test_probe_heads_stay_identical_under_ddp(tmp_path):
    """Two gloo ranks: the probe trains on the all-gathered batch, so the heads never drift apart."""
    script = tmp_path / "ddp_probe.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from pytorch_lightning.callbacks import Callback
        from selfsup.train import pretrain

        class Check(Callback):
            def on_train_end(self, trainer, pl_module):
                probe = next(c for c in trainer.callbacks if type(c).__name__ == "OnlineLinearProbe")
                w = probe.head[1].weight.detach()
                gathered = pl_module.all_gather(w)  # (2, C, D)
                if trainer.is_global_zero:
                    torch.save({{"same": bool(torch.equal(gathered[0], gathered[1])),
                                "trained": bool(probe.optimizer.state)}}, r"{tmp_path / 'out.pt'}")

        cfg = {{"model": {{"backbone": "convnet_small"}},
               "data": {{"data": "digits", "image_size": 16, "batch_size": 64}},
               "trainer": {{"max_epochs": 1, "devices": 2, "strategy": "ddp", "accelerator": "cpu"}},
               "output": r"{tmp_path / 'runs'}", "name": "ddp"}}
        result = pretrain(cfg, callbacks=[Check()])
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out == {"same": True, "trained": True}
    assert (tmp_path / "runs" / "ddp" / "export" / "encoder.safetensors").is_file()
