import json
import subprocess
import sys

import pytest
import torch

import selfsup
from selfsup.errors import CheckpointError, ConfigError
from selfsup.pretext.rotation import Rotation
from selfsup.ssl.module import CHECKPOINT_METHOD_KEY, warmup_cosine
from tests.conftest import perturb_


def test_registry_holds_rotation():
    assert selfsup.METHODS["rotation"] is Rotation
    assert {"convnet_small", "cifar_resnet18"} <= set(selfsup.BACKBONES)


def test_misspelt_option_fails():
    with pytest.raises(TypeError):
        Rotation(backbone="convnet_small", lrr=0.1)
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        Rotation(backbone="convnet_small", optimizer="adam")


def test_hparams_rebuild_the_model():
    m = Rotation(backbone="convnet_small", norm="group", lr=0.3, head_hidden=16)
    again = Rotation(**dict(m.hparams))
    assert dict(again.hparams) == dict(m.hparams)
    assert again.hparams.norm == "group" and again.hparams.head_hidden == 16


def test_export_load_encoder_bit_identical(tmp_path):
    torch.manual_seed(0)
    m = Rotation(backbone="convnet_small", norm="group")
    perturb_(m)
    m.eval()
    x = torch.rand(4, 3, 24, 24)
    expected = m.encode(x)
    m.export(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"encoder.safetensors", "config.json"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["method"] == "rotation" and cfg["num_features"] == 128
    enc = selfsup.load_encoder(tmp_path)
    assert not enc.training and enc.num_features == 128
    with torch.no_grad():
        got = enc(x)
    assert torch.equal(got, expected)
    # uint8 input is the same as its [0, 1] float version
    u8 = (x * 255).round().to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(enc(u8), enc(u8.float() / 255))


def test_load_encoder_bad_dir(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        selfsup.load_encoder(tmp_path)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lars"])
def test_optimizers_and_no_decay_groups(optimizer):
    m = Rotation(backbone="convnet_small", optimizer=optimizer, weight_decay=0.1)
    opt = m.build_optimizer(m.parameters())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])


def test_warmup_cosine_schedule():
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] < 0.01


def _schedule_of(tmp_path, name, trainer, stop_after=None):
    """LRs of each step of a tiny digits run (5 steps an epoch) and the scheduler's LR after the last."""
    from pytorch_lightning.callbacks import Callback

    from selfsup.train import pretrain

    class Record(Callback):
        def __init__(self):
            self.lrs = []

        def on_train_batch_start(self, t, *args):
            self.lrs.append(t.optimizers[0].param_groups[0]["lr"])

        def on_train_batch_end(self, t, *args):
            if len(self.lrs) == stop_after:
                t.should_stop = True

        def on_train_end(self, t, *args):
            self.final = t.lr_scheduler_configs[0].scheduler.get_last_lr()[0]

    rec = Record()
    pretrain({"method": "rotation", "model": {"backbone": "convnet_small", "lr": 0.1, "warmup_epochs": 1.0},
              "data": {"image_size": 8, "batch_size": 256}, "trainer": trainer, "online_probe": False,
              "output": str(tmp_path), "name": name}, callbacks=[rec])
    return rec.lrs, rec.final


@pytest.mark.slow
def test_lr_schedule_ends_at_max_steps_with_unbounded_epochs_and_warms_up_one_real_epoch(tmp_path):
    lrs, final = _schedule_of(tmp_path, "steps", {"max_epochs": -1, "max_steps": 12})
    assert len(lrs) == 12
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # one epoch (5 steps) of warm-up, not half the run
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:], strict=False)) and lrs[-1] < 0.01
    assert final == pytest.approx(0.0, abs=1e-9)  # the cosine ends exactly at step 12


@pytest.mark.slow
def test_lr_with_only_a_time_limit_is_constant_after_warm_up(tmp_path):
    # an hour's limit that the test does not wait for: it stops the run itself after 8 steps
    lrs, final = _schedule_of(tmp_path, "time", {"max_epochs": -1, "max_steps": -1, "max_time": "1h"}, stop_after=8)
    assert len(lrs) == 8, lrs
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[5:] == pytest.approx([0.1] * (len(lrs) - 5)) and final == pytest.approx(0.1)


@pytest.mark.slow
def test_project_root_does_not_shadow_stdlib_ssl():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", "import ssl, sys; print(ssl.__file__); import selfsup.ssl"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout
    ssl_file = out.strip().splitlines()[0]
    assert not ssl_file.startswith(str(root)), f"the project shadows the standard library ssl: {ssl_file}"
    assert not (root / "ssl").exists() and not (root / "pretext").exists()


def test_method_arguments_walk_the_class_chain():
    from selfsup.ssl.cpc import CPC
    from selfsup.ssl.module import SSLModule, method_arguments

    base = [k for k in method_arguments(SSLModule) if k]
    for cls in selfsup.METHODS.values():
        args = method_arguments(cls)
        assert list(args)[: len(base)] == base, cls  # every base argument, base first
        assert "in_chans" not in args  # set by the method, never an option
        m_defaults = {k: p.default for k, p in args.items()}
        assert set(m_defaults) >= set(base)
    cpc = {k: p.default for k, p in method_arguments(CPC).items()}
    assert (cpc["norm"], cpc["optimizer"], cpc["lr"], cpc["weight_decay"]) == ("layer", "adamw", 2e-4, 0.0)
    assert CPC(backbone="convnet_small").hparams.optimizer == "adamw"  # the class applies its own defaults
    assert set(CPC(backbone="convnet_small").hparams) == set(cpc)


def test_build_method_names_a_misspelt_argument():
    from selfsup.ssl.module import build_method

    with pytest.raises(ConfigError, match=r"no argument 'head_hiden' \(did you mean 'head_hidden'\?\)"):
        build_method("rotation", {"backbone": "convnet_small", "head_hiden": 3})
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("rotatoin", {})


def test_lightness_input_takes_rgb():
    from selfsup.ssl.module import Lightness

    x = torch.rand(2, 3, 8, 8)
    out = Lightness()(x)
    assert out.shape == (2, 1, 8, 8) and out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5
    white_black = torch.stack([torch.ones(3, 2, 2), torch.zeros(3, 2, 2)])
    torch.testing.assert_close(Lightness()(white_black).flatten(1)[:, 0], torch.tensor([1.0, -1.0]), atol=1e-3, rtol=0)
    grey = torch.full((1, 1, 2, 2), 0.5)
    torch.testing.assert_close(Lightness()(grey), Lightness()(grey.expand(-1, 3, -1, -1)))


def test_channels_last_changes_layout_not_results():
    torch.manual_seed(0)
    m = Rotation(backbone="convnet_small", channels_last=True).eval()
    ref = Rotation(**dict(m.hparams) | {"channels_last": False}).eval()
    ref.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 16, 16)
    m.on_fit_start()
    conv = next(p for p in m.backbone.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert m.augment(x).is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(m.loss((x, None))["loss"], ref.loss((x, None))["loss"])


def test_load_encoder_from_run_dir_export_and_checkpoint(tmp_path):
    import os

    from selfsup.train import pretrain

    cfg = {"model": {"backbone": "convnet_small"}, "data": {"data": "digits", "image_size": 16, "batch_size": 64},
           "trainer": {"max_steps": 2}, "output": str(tmp_path), "name": "r", "online_probe": False}
    run = pretrain(cfg).run_dir
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = selfsup.load_encoder(run / "export")(x)
        ckpt = run / "checkpoints" / "last.ckpt"
        for src in (run, ckpt):
            enc = selfsup.load_encoder(src)
            assert enc.config["method"] == "rotation" and not enc.training
            torch.testing.assert_close(enc(x), want, rtol=0, atol=0)
        (run / "export" / "config.json").unlink()  # an unfinished run: its newest checkpoint
        torch.testing.assert_close(selfsup.load_encoder(run)(x), want, rtol=0, atol=0)
    # the checkpoint names its method itself: no config.yaml needed
    lone = tmp_path / "lone.ckpt"
    os.link(ckpt, lone)
    assert selfsup.load_encoder(lone).config["method"] == "rotation"


class _Foreign:
    """A class torch's weights-only unpickler does not allow-list (it lives in this test module)."""


def _refusal(path) -> str:
    with pytest.raises(CheckpointError) as err:
        selfsup.load_encoder(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "weights_only=False" not in text
    return text


def test_load_encoder_refuses_checkpoints_that_would_run_code_or_are_not_ours(tmp_path):
    from tests.test_checkpoint import _RunsACommand

    marker = tmp_path / "pwned"
    runs_code = tmp_path / "runs_code.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, CHECKPOINT_METHOD_KEY: "rotation",
                "x": _RunsACommand(marker)}, runs_code)
    assert "was not loaded (it names code to run" in _refusal(runs_code)
    assert not marker.exists()  # nothing in the file ran
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": _Foreign()}, foreign)
    assert "was not loaded" in _refusal(foreign)
    first_key = next(iter(Rotation(backbone="convnet_small").state_dict()))
    # harmless contents torch loads, but not a selfsup checkpoint: one line each, saying so
    for name, obj, why in [
        ("nomethod", {"state_dict": {}, "hyper_parameters": {}, "x": 1}, "does not name its method"),
        ("list", [1, 2], "no state_dict and hyper_parameters"),
        ("strweights", {"state_dict": {"w": "text"}, "hyper_parameters": {}}, "'w' is a str, not a tensor"),
        ("shapes", {"state_dict": {first_key: torch.zeros(1)}, "hyper_parameters": {"backbone": "convnet_small"},
                    CHECKPOINT_METHOD_KEY: "rotation"}, "weights do not match the rotation model"),
    ]:
        path = tmp_path / f"{name}.ckpt"
        torch.save(obj, path)
        text = _refusal(path)
        assert why in text, text
        assert name == "shapes" or "not a selfsup checkpoint" in text
    # an object torch may allow-list or refuse depending on its version (2.14 allows Exception):
    # either way one line, and never a later, unrelated error
    odd = tmp_path / "exception.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": Exception("pickled object")}, odd)
    text = _refusal(odd)
    assert "not a selfsup checkpoint" in text or "was not loaded" in text


def test_list_methods_and_backbones():
    assert selfsup.list_methods() == sorted(selfsup.METHODS) and "rotation" in selfsup.list_methods()
    assert {"convnet_small", "cifar_resnet18"} <= set(selfsup.list_backbones())
    timm_names = selfsup.list_backbones("resnet1*")
    assert "resnet18" in timm_names and "convnet_small" in timm_names
