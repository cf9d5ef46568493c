"""BiGAN/ALI and DCGAN: the losses, which player each step moves, a short stable run, export, CLI and resume."""

import json
import math

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

import selfsup
from selfsup.errors import CheckpointError, ConfigError
from selfsup.ssl.backbone import Backbone
from selfsup.ssl.generative.gan import (
    DCGAN,
    BiGAN,
    Generator,
    discriminator_loss,
    generator_loss,
    mean_pairwise_distance,
)
from tests.conftest import fixed_batch, perturb_, run_cli

SMALL = {"backbone": "convnet_small", "image_size": 16, "g_width": 8, "z_dim": 16, "crop_scale": 1.0, "flip": False}
BIGAN_SMALL = {**SMALL, "d_width": 8, "d_hidden": 32}


@pytest.fixture(autouse=True)
def _one_thread():
    """These tiny models run fastest on one thread; two contend badly on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(cls, **kw):
    return cls(**(BIGAN_SMALL if cls is BiGAN else SMALL), **kw)


def test_losses_against_naive_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    hinge_d = sum(max(0, 1 - r) for r in real.tolist()) / 3 + sum(max(0, 1 + f) for f in fake.tolist()) / 3
    torch.testing.assert_close(discriminator_loss(real, fake, "hinge"), torch.tensor(hinge_d))
    sig = torch.sigmoid
    ns_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    torch.testing.assert_close(discriminator_loss(real, fake, "ns"), ns_d)
    # the generator (and BiGAN's encoder) want the opposite labels
    torch.testing.assert_close(generator_loss(fake, None, "hinge"), -fake.mean())
    torch.testing.assert_close(generator_loss(fake, real, "hinge"), -fake.mean() + real.mean())
    ns_g = -(torch.log(sig(fake)).mean() + torch.log(1 - sig(real)).mean())
    torch.testing.assert_close(generator_loss(fake, real, "ns"), ns_g)


def test_mean_pairwise_distance_and_generator_shapes():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(mean_pairwise_distance(x), torch.tensor((5 + 5 + 0) * 2 / 6))
    for size in (8, 16, 24):  # 24 is generated at 32 and resized
        out = Generator(4, size, width=4)(torch.randn(2, 4))
        assert out.shape == (2, 3, size, size) and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ConfigError, match="gan_loss"):
        BiGAN(backbone="convnet_small", gan_loss="wasserstein")


@pytest.mark.parametrize("cls", [BiGAN, DCGAN])
@pytest.mark.parametrize("player", ["d", "g"])
def test_one_step_lowers_each_players_loss_on_a_fixed_batch(cls, player):
    torch.manual_seed(0)
    m = _model(cls)
    m.train()
    batch, z = fixed_batch(), torch.randn(16, 16)
    params = m.discriminator_parameters() if player == "d" else m.generator_parameters()
    opt = torch.optim.Adam(params, lr=1e-3)
    key = f"{player}_loss"
    before = m.loss(batch, z)[key]
    opt.zero_grad()
    before.backward()
    opt.step()
    assert float(m.loss(batch, z)[key]) < float(before)


class _Watch(pl.Callback):
    """Snapshots every parameter before each optimiser step, to see which ones each step moved."""

    def __init__(self):
        self.snaps, self.outputs = [], []

    def _snap(self, module):
        self.snaps.append({n: p.detach().clone() for n, p in module.named_parameters()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._snap(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._snap(pl_module)
        self.outputs.append(outputs)


def _moved(a, b):
    return {n for n in a if not torch.equal(a[n], b[n])}


@pytest.mark.parametrize("cls", [BiGAN, DCGAN])
def test_short_run_steps_each_player_only_and_stays_finite(cls, tmp_path):
    torch.manual_seed(0)
    # non-saturating: under hinge, D's last bias gets exactly zero gradient while every logit is inside
    # the margin (as in a short run), and this test checks that every parameter moves
    m = _model(cls, num_samples=16, gan_loss="ns")
    d_names = {n for n, p in m.named_parameters() if any(p is q for q in m.discriminator_parameters())}
    g_names = {n for n, _ in m.named_parameters()} - d_names
    assert d_names and g_names
    if cls is BiGAN:
        assert all(n.startswith("discriminator.") for n in d_names) and any(n.startswith("backbone.") for n in g_names)
    else:
        assert any(n.startswith("backbone.") for n in d_names) and all(n.startswith("generator.") for n in g_names)
    images = torch.randint(0, 256, (20 * 8, 3, 16, 16), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=8)
    watch = _Watch()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[watch], default_root_dir=str(tmp_path))
    trainer.fit(m, loader)
    assert trainer.global_step == 40  # two optimiser steps per batch
    snaps = watch.snaps  # per batch: before D's step, before G's step, after both
    assert len(snaps) == 60
    moved_d, moved_g = set(), set()
    for i in range(0, 60, 3):
        moved_d |= _moved(snaps[i], snaps[i + 1])
        moved_g |= _moved(snaps[i + 1], snaps[i + 2])
        assert moved_d <= d_names and moved_g <= g_names  # each step moves its own player only
    assert moved_d == d_names and moved_g == g_names  # and, over the run, all of it
    for out in watch.outputs:
        assert torch.isfinite(out["d_loss"]) and torch.isfinite(out["g_loss"])
        # the online probe's features come from the training pass (BiGAN: E's; DCGAN: D's, every stage)
        assert out["features"].shape == (8, m.num_features) and not out["features"].requires_grad
    samples = m.sample(16)
    assert torch.isfinite(samples).all() and samples.std(0).mean() > 1e-3  # samples differ from each other
    assert (tmp_path / "samples" / "epoch_000.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "samples" / "recon_epoch_000.png").is_file() == (cls is BiGAN)


@pytest.mark.parametrize(("cls", "kw"), [(BiGAN, {}), (DCGAN, {}), (DCGAN, {"probe_features": "pooled"})])
def test_export_round_trip_reproduces_encode(cls, kw, tmp_path):
    torch.manual_seed(0)
    m = _model(cls, **kw)
    perturb_(m)
    m.eval()
    x = torch.rand(4, 3, 16, 16)
    expected = m.encode(x)
    m.export(tmp_path)
    enc = selfsup.load_encoder(tmp_path)
    with torch.no_grad():
        assert torch.equal(enc(x), expected)
    config = json.loads((tmp_path / "config.json").read_text())
    assert expected.shape == (4, m.num_features) and enc.num_features == config["num_features"] == m.num_features
    if cls is DCGAN:
        pooled = kw.get("probe_features") == "pooled"
        assert config["hparams"]["probe_features"] == config["probe_features"] == ("pooled" if pooled else "all_layers")
        assert m.num_features == (128 if pooled else 16 * (32 + 64 + 128 + 128))
        assert ("global-average-pooled last layer" if pooled else "every stage") in config["note"]


def test_dcgan_export_from_before_probe_features_is_refused_not_reread(tmp_path):
    """An export written when DCGAN probed its pooled last layer must not load as all-layer features."""
    m = _model(DCGAN, probe_features="pooled")
    m.export(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["hparams"]["probe_features"], cfg["probe_features"]  # as written before the option existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="exported with 128 features.*5632.*now at their defaults: probe_features"):
        selfsup.load_encoder(tmp_path)
    cfg["hparams"]["probe_features"] = "pooled"  # the fix the message points to
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert selfsup.load_encoder(tmp_path).num_features == 128


def _naive_max_pool(fmap: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """Adaptive max pooling by its definition, cell by cell: rows floor(i*H/g) to ceil((i+1)*H/g). (B, C*g*g)."""
    h, w = fmap.shape[-2:]
    cells = torch.empty(*fmap.shape[:2], grid, grid)
    for i in range(grid):
        for j in range(grid):
            rows = slice(i * h // grid, math.ceil((i + 1) * h / grid))
            cols = slice(j * w // grid, math.ceil((j + 1) * w / grid))
            cells[:, :, i, j] = fmap[:, :, rows, cols].amax(dim=(2, 3))
    return cells.flatten(1)


def _stages_by_hand(backbone: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    """Each stage of the two registered nets, run layer by layer without forward_intermediates."""
    net = backbone.model
    if backbone.name == "convnet_small":
        out = []
        for block in net.features:
            x = block(x)
            out.append(x)
        return out
    out = [net.act1(net.bn1(net.conv1(x)))]  # cifar_resnet18: the stem (its max-pool is an identity), 4 stages
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        out.append(layer(out[-1]))
    return out


@pytest.mark.parametrize(("backbone", "channels"), [("convnet_small", [32, 64, 128, 128]),
                                                     ("cifar_resnet18", [64, 64, 128, 256, 512])])
def test_dcgan_all_layer_features_match_stages_run_by_hand(backbone, channels):
    torch.manual_seed(0)
    m = DCGAN(**{**SMALL, "backbone": backbone})
    perturb_(m)
    for mod in m.modules():  # running statistics away from (0, 1): eval-mode features depend on them
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    m.eval()
    enc = m.encoder()
    assert enc.num_features == m.num_features == 16 * sum(channels)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = torch.rand(3, 3, 16, 16)  # 16 px: stages of 16, 8, 4 and 2 px (the 2 px ones are repeated up to 4x4)
    with torch.no_grad():
        stages = _stages_by_hand(m.backbone, (x - mean[:, None, None]) / std[:, None, None])
        assert [s.shape[1] for s in stages] == channels
        expected = torch.cat([_naive_max_pool(s) for s in stages], dim=1)
        got = enc(x)
    assert got.shape == (3, 16 * sum(channels))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # uint8 in: the same as its [0, 1] floats
        u8 = (x * 255).round().to(torch.uint8)
        torch.testing.assert_close(enc(u8), enc(u8.float() / 255))


@pytest.mark.parametrize("probe_features", ["all_layers", "pooled"])
def test_dcgan_discriminator_pass_gives_the_exported_features_of_the_reals(probe_features):
    """The online probe's training features come from D's pass on reals + fakes; in eval mode they are the export's."""
    torch.manual_seed(0)
    m = _model(DCGAN, probe_features=probe_features)
    perturb_(m)
    m.eval()
    x, fake = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        real_logits, fake_logits, feats = m.d_logits(m.normalize(x), m.normalize(fake), None, None, features=True)
        torch.testing.assert_close(feats, m.encode(x), rtol=1e-5, atol=1e-5)
        # the logits do not depend on whether the features were asked for
        plain = m.d_logits(m.normalize(x), m.normalize(fake), None, None)
    assert plain[2] is None
    torch.testing.assert_close(torch.cat([real_logits, fake_logits]), torch.cat(plain[:2]), rtol=1e-6, atol=1e-6)


def test_dcgan_bad_probe_features_is_one_config_error_line(monkeypatch):
    with pytest.raises(ConfigError) as err:
        _model(DCGAN, probe_features="all")
    assert "probe_features" in str(err.value) and "'all'" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(Backbone, "has_stages", property(lambda self: False))  # a timm model without stages
    with pytest.raises(ConfigError, match="probe_features='pooled'") as err:
        _model(DCGAN)
    assert "\n" not in str(err.value)
    assert _model(DCGAN, probe_features="pooled").num_features == 128


FAST = ["--backbone", "convnet_small", "--data", "digits", "--image-size", "16", "--batch-size", "256",
        "--g-width", "8", "--z-dim", "16"]


@pytest.mark.slow
def test_cli_dcgan_writes_samples_and_probes_pooled_features(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the subprocess's torch: one thread, as above
    r = run_cli("pretrain", "--method", "dcgan", *FAST, "--max-steps", "6", "--probe-features", "pooled",
                "--name", "d", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "d"
    assert (run / "samples" / "epoch_000.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"train/d_loss", "train/g_loss", "train/d_real_acc", "train/d_fake_acc", "train/online_loss"} <= set(metrics)
    assert "probed (online and exported): the global-average-pooled last layer of the DCGAN discriminator (128 " \
        "features)" in r.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["probe_features"] == "pooled"
    enc = selfsup.load_encoder(run / "export")
    assert enc.config["hparams"]["probe_features"] == "pooled" and "pooled" in enc.config["note"]
    assert enc(torch.rand(2, 3, 16, 16)).shape == (2, 128)


@pytest.mark.slow
def test_cli_bigan_pretrains_and_resumes_both_optimisers(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["pretrain", "--method", "bigan", *FAST, "--d-width", "8", "--d-hidden", "32", "--no-online-probe"]
    r = run_cli(*args, "--max-epochs", "1", "--name", "b", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "b"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["image_size"] == 16
    for f in ("samples/epoch_000.png", "samples/recon_epoch_000.png", "export/encoder.safetensors"):
        assert (run / f).is_file(), f
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    batches = ckpt["global_step"] // 2
    assert len(ckpt["optimizer_states"]) == 2 and batches > 0

    r = run_cli("pretrain", "--resume", "--name", "b", "--max-epochs", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt2 = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt2["global_step"] == 2 * ckpt["global_step"] and ckpt2["epoch"] == 1
    for opt in ckpt2["optimizer_states"]:  # both players' Adam states went on from the saved ones
        assert all(float(s["step"]) == 2 * batches for s in opt["state"].values())
    assert [s["last_epoch"] for s in ckpt2["lr_schedulers"]] == [2 * batches, 2 * batches]
    assert (run / "samples" / "epoch_001.png").is_file()
    enc = selfsup.load_encoder(run / "export")
    assert enc(torch.rand(2, 3, 16, 16)).shape == (2, 128)
