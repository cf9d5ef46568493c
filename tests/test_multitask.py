import sys
import warnings

import pytest
import torch
import yaml

import selfsup
from selfsup import cli
from selfsup.errors import ConfigError
from selfsup.pretext.multitask import MultiTask, parse_tasks
from selfsup.pretext.task import TASKS, Task, register_task
from selfsup.train import RUN_DIR_ENV
from tests.conftest import fixed_batch, perturb_, run_cli
from tests.test_relative_position import seeded_loss_before_and_after_one_step

# colorization joins every combination below as soon as it is registered
EXTRA = ["colorization"] if "colorization" in TASKS else []


def test_task_names_and_weights_are_validated():
    assert parse_tasks("rotation, jigsaw", None) == (("rotation", "jigsaw"), (1.0, 1.0))
    assert parse_tasks("rotation,jigsaw", "1,0.5") == (("rotation", "jigsaw"), (1.0, 0.5))
    with pytest.raises(ConfigError, match="unknown task 'rotaton'.*did you mean 'rotation'"):
        parse_tasks("rotaton,jigsaw", None)
    for tasks, weights in (("rotation,jigsaw", "1"), ("rotation,jigsaw", "1,x"), ("rotation,rotation", None),
                           ("", None), ("rotation,jigsaw", "0,0")):
        with pytest.raises(ConfigError):
            parse_tasks(tasks, weights)


def test_weighted_sum_and_per_task_logs():
    torch.manual_seed(0)
    names = ["rotation", "relative_position", "jigsaw", *EXTRA]
    weights = [1.0, 0.5, 2.0, *([0.5] * len(EXTRA))]
    model = MultiTask(backbone="convnet_small", tasks=",".join(names), task_weights=",".join(map(str, weights)))
    out = model.loss(fixed_batch(n=8, size=32))
    expected = sum(w * out[f"{t}_loss"] for t, w in zip(names, weights, strict=True))
    torch.testing.assert_close(out["loss"].detach(), expected)
    for t in names:
        assert f"{t}_acc" in out, sorted(out)
    assert out["features"].shape == (8, model.num_features)  # rotation's, reused by the online probe


def test_a_lightness_task_makes_every_task_see_lightness():
    @register_task("_grey_test")
    class Grey(Task):
        in_chans = 1

        def __init__(self, num_features, in_chans=3):
            super().__init__()
            self.head = torch.nn.Linear(num_features, 1)

        def forward(self, x, backbone, prepare):
            inputs = prepare(x)
            assert inputs.shape[1] == 1
            return {"loss": self.head(backbone(inputs)).pow(2).mean()}

    try:
        model = MultiTask(backbone="convnet_small", tasks="_grey_test,relative_position")
        assert model.backbone.in_chans == 1
        assert torch.isfinite(model.loss(fixed_batch(n=4, size=32))["loss"])
        assert MultiTask(backbone="convnet_small", tasks="rotation").backbone.in_chans == 3
    finally:
        del TASKS["_grey_test"]


def test_one_step_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = MultiTask(backbone="convnet_small", tasks=",".join(["rotation", "relative_position", "jigsaw", *EXTRA]),
                      optimizer="adamw", lr=1e-3, crop_scale=1.0, flip=False)
    before, after = seeded_loss_before_and_after_one_step(model, fixed_batch(n=8, size=32))
    assert after < before


@pytest.mark.parametrize(
    "method,kw",
    [("relative_position", {}), ("jigsaw", {}), ("multitask", {"tasks": ",".join(["relative_position", *EXTRA])}),
     ("multitask", {"tasks": "rotation,cpc", "norm": "layer"})],
)
def test_export_round_trip_is_exact(tmp_path, method, kw):
    torch.manual_seed(0)
    model = selfsup.METHODS[method](backbone="convnet_small", **kw)
    perturb_(model)
    model.eval()
    x = torch.rand(3, 3, 32, 32)
    enc = selfsup.load_encoder(model.export(tmp_path / "export"))
    assert torch.equal(enc(x), model.encode(x))


@pytest.mark.slow
def test_two_tasks_pretrain_on_the_digits_through_the_cli(tmp_path):
    tasks = ",".join([*(EXTRA or ["rotation"]), "relative_position"])
    # no --image-size: the digits' default 32 px (7 px tiles)
    r = run_cli("pretrain", "--method", "multitask", "--tasks", tasks, "--task-weights", "1,0.5",
                "--backbone", "convnet_small", "--max-steps", "2", "--log-every-n-steps", "1", "--batch-size", "32",
                "--name", "m", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "m"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["tasks"] == tasks
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for t in tasks.split(","):
        assert f"train/{t}_loss" in header and f"train/{t}_acc" in header, header
    enc = selfsup.load_encoder(run / "export")
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, enc.num_features)


def test_rotation_and_cpc_share_the_backbone_and_one_step_lowers_their_loss():
    torch.manual_seed(0)
    model = MultiTask(backbone="convnet_small", tasks="cpc,rotation", norm="layer", optimizer="adamw", lr=3e-4,
                      crop_scale=1.0, flip=False)
    batch = fixed_batch(n=8, size=32)
    out = model.loss(batch)
    for k in ("cpc_loss", "cpc_acc", "rotation_loss", "rotation_acc"):
        assert k in out and out[k].ndim == 0, sorted(out)
    torch.testing.assert_close(out["loss"].detach(), out["cpc_loss"] + out["rotation_loss"])
    # the probe reuses rotation's whole-image features (the encoder's), not cpc's mean of patch vectors
    torch.testing.assert_close(out["features"], model.encode(batch[0]), rtol=1e-4, atol=1e-4)
    before, after = seeded_loss_before_and_after_one_step(model, batch)
    assert after < before


def test_cpc_on_a_batch_norm_backbone_warns_once_when_training_starts():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building (as load_encoder does) is silent
        model = MultiTask(backbone="convnet_small", tasks="rotation,cpc")
    with pytest.warns(UserWarning, match="batch-norm backbone.*--norm layer") as record:
        model.on_fit_start()
    assert len([w for w in record if "batch-norm" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultiTask(backbone="convnet_small", tasks="rotation,cpc", norm="layer").on_fit_start()
        MultiTask(backbone="convnet_small", tasks="rotation,jigsaw").on_fit_start()


def test_cpc_with_colorization_sees_lightness():
    torch.manual_seed(0)
    model = MultiTask(backbone="convnet_small", tasks="colorization,cpc", norm="layer")
    assert model.backbone.in_chans == 1
    out = model.loss(fixed_batch(n=4, size=32))
    assert torch.isfinite(out["loss"]) and "cpc_acc" in out and "colorization_acc" in out


@pytest.mark.slow
def test_rotation_and_cpc_pretrain_on_the_digits_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["selfsup"])
    monkeypatch.setenv(RUN_DIR_ENV, "")  # restored after the test: pretrain sets it for DDP ranks
    with pytest.warns(UserWarning, match="--norm layer"):  # the default norm: the user is told
        rc = cli.main(["pretrain", "--method", "multitask", "--tasks", "rotation,cpc", "--backbone", "convnet_small",
                       "--data", "digits", "--image-size", "16", "--batch-size", "16", "--max-steps", "2",
                       "--log-every-n-steps", "1", "--name", "m"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "runs" / "m"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for k in ("train/cpc_loss", "train/cpc_acc", "train/rotation_loss", "train/rotation_acc"):
        assert k in header, header
    enc = selfsup.load_encoder(run / "export")
    with torch.no_grad():
        assert enc(torch.rand(2, 3, 16, 16)).shape == (2, enc.num_features)
