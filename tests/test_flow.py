import csv
import math

import pytest
import torch

import selfsup
from selfsup.errors import ConfigError
from selfsup.ssl.generative.flow import Flow, dequantize
from selfsup.ssl.generative.flow_layers import (
    ActNorm,
    AffineCoupling,
    FlowStep,
    InvConv1x1,
    MultiScaleFlow,
    VariationalDequantizer,
)
from tests.conftest import fixed_batch, loss_before_and_after_one_step, perturb_, run_cli

LAYERS = {
    "actnorm": lambda: ActNorm(4),
    "invconv": lambda: InvConv1x1(4),
    "coupling": lambda: AffineCoupling(4, hidden=8),
    "step": lambda: FlowStep(4, hidden=8),
}


def _away_from_identity(module, scale=0.3):
    """Perturb every weight (zero-init convs included) so that no layer is the identity."""
    torch.manual_seed(1)
    perturb_(module, scale=scale)
    return module


def _flat_flow(flow, shape):
    """The whole flow as a map R^D -> R^D (the latents of every scale flattened and concatenated)."""

    def f(v):
        latents, _, _ = flow(v.view(shape))
        return torch.cat([z.flatten(1) for z in latents], dim=1).flatten()

    return f


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_inverts_and_logdet_equals_brute_force_jacobian(name):
    torch.manual_seed(0)
    layer = _away_from_identity(LAYERS[name]()).double()
    layer.eval()  # actnorm keeps its (perturbed) parameters instead of initialising from x
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    y, logdet = layer(x)
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-4, rtol=0)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.view_as(x))[0].flatten(), x.flatten(), vectorize=True)  # (64, 64)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac).logabsdet.view(1), atol=1e-8, rtol=1e-8)
    assert abs(logdet.item()) > 0.1  # a perturbed layer is not volume-preserving: the check is not vacuous


def test_whole_flow_inverts_and_logdet_equals_brute_force_jacobian():
    torch.manual_seed(0)
    flow = _away_from_identity(MultiScaleFlow(3, levels=2, steps=2, hidden=8), 0.2).double().eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    latents, logdet, _ = flow(x)
    assert [tuple(z.shape) for z in latents] == [(1, 6, 2, 2), (1, 24, 1, 1)]
    torch.testing.assert_close(flow.inverse(latents), x, atol=1e-4, rtol=0)
    jac = torch.autograd.functional.jacobian(_flat_flow(flow, x.shape), x.flatten(), vectorize=True)  # (48, 48)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac).logabsdet.view(1), atol=1e-8, rtol=1e-8)
    assert abs(logdet.item()) > 0.1


def test_flow_inverts_a_batch_in_float32_within_1e4():
    torch.manual_seed(0)
    flow = MultiScaleFlow(3, levels=3, steps=2, hidden=16)
    flow.train()
    x = torch.rand(4, 3, 16, 16) - 0.5
    flow(x)  # actnorm data-dependent init
    perturb_(flow, scale=0.05)
    latents, _, _ = flow(x)
    assert (flow.inverse(latents) - x).abs().max() < 1e-4


def _discretised_gaussian(n=256, size=8, seed=0):
    """uint8 images whose channel c is round(N(mean_c, std_c^2)) in levels, and the analytic bits/dim."""
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor([100.0, 128.0, 150.0]), torch.tensor([10.0, 20.0, 30.0])
    x = torch.randn(n, 3, size, size, generator=g) * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    images = x.round().clamp(0, 255).to(torch.uint8)
    # Uniform dequantisation adds variance 1/12 (in levels); the best Gaussian of level + u has
    # cross-entropy 0.5 log2(2 pi e (std^2 + 1/12)) bits, the entropy of the discrete data to < 1e-3 bits.
    analytic = (0.5 * torch.log2(2 * math.pi * math.e * (std**2 + 1 / 12))).mean()
    return images, mean, float(analytic)


def test_bits_per_dim_of_a_discretised_gaussian_equals_its_analytic_value():
    # At initialisation every coupling is the identity and every 1x1 convolution a rotation, so after
    # actnorm's data-dependent init the flow's density is exactly the Gaussian fitted to the data:
    # its bits/dim must be the analytic value (wrong log-det signs, scalings or log 256 would show).
    torch.manual_seed(0)
    model = Flow(levels=2, steps=2, hidden=8, flip=False)
    images, _, analytic = _discretised_gaussian()
    model.train()
    model.bits_per_dim(images)  # actnorm init on the first batch
    model.eval()
    bpd, _ = model.bits_per_dim(images)
    assert abs(bpd.mean().item() - analytic) < 0.01, (bpd.mean().item(), analytic)


def test_temperature_zero_samples_the_mean_image():
    torch.manual_seed(0)
    model = Flow(levels=2, steps=2, hidden=8, flip=False)
    images, mean, _ = _discretised_gaussian()
    model.train()
    model.bits_per_dim(images)
    model.eval()
    # the data's mean image: each channel at its mean level (plus the dequantisation's half level), up to
    # the error of actnorm's batch estimate (std / sqrt(4096 samples per squeezed channel) <= 0.002)
    expected = ((mean + 0.5) / 256).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    torch.testing.assert_close(model.sample(2, 8, temperature=0.0), expected, atol=0.01, rtol=0)
    # a trained-like flow (learned split prior): every temperature-0 draw is the same image
    perturb_(model, scale=0.05)
    zero = model.sample(4, 8, temperature=0.0)
    assert torch.equal(zero, zero[:1].expand_as(zero))
    warm = model.sample(4, 8, temperature=0.7, seed=0)
    assert (warm - warm[:1]).abs().amax(dim=(1, 2, 3))[1:].min() > 0.01
    torch.testing.assert_close(model.sample(4, 8, temperature=0.7, seed=0), warm)


def test_one_step_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = Flow(levels=2, steps=2, hidden=16, flip=False)
    loss = model.loss
    model.loss = lambda batch: (torch.manual_seed(0), loss(batch))[1]  # the same dequantisation noise both times
    before, after = loss_before_and_after_one_step(model, fixed_batch())
    assert after < before


def test_actnorm_initialises_once_and_survives_export(tmp_path):
    torch.manual_seed(0)
    model = Flow(levels=2, steps=1, hidden=8)
    model.train()
    model.loss(fixed_batch(size=8))
    perturb_(model)
    model.eval()
    x = torch.rand(5, 3, 8, 8)
    expected = model.encode(x)
    assert expected.shape == (5, model.num_features) == (5, 2 * (6 + 24))
    model.export(tmp_path)
    enc = selfsup.load_encoder(tmp_path)
    with torch.no_grad():
        assert torch.equal(enc(x), expected)
        # a loaded (or resumed) actnorm is initialised: training mode on new data must not re-initialise it
        enc.train()
        enc(torch.rand(5, 3, 8, 8) * 0.1)
        assert torch.equal(enc.eval()(x), expected)


def test_a_flow_rejects_a_backbone_and_bad_sizes():
    with pytest.raises(ConfigError, match="flow has no backbone"):
        Flow(backbone="cifar_resnet18")
    with pytest.raises(ConfigError, match="crop_scale"):
        Flow(crop_scale=0.5)
    with pytest.raises(ConfigError, match="divisible by 8"):
        Flow(levels=3).encode(torch.rand(1, 3, 12, 12))
    assert Flow().backbone is None  # SSLModule's default trunk is not kept


def test_dequantize_maps_levels_into_their_bins():
    x = torch.tensor([0, 1, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    y = dequantize(x)
    assert ((y + 0.5) * 256 - x.float()).min() >= 0 and ((y + 0.5) * 256 - x.float()).max() < 1
    torch.testing.assert_close(dequantize(x.float() / 255, noise=False), (x.float() + 0.5) / 256 - 0.5)


@pytest.mark.slow
def test_cli_pretrains_a_flow_with_bits_per_dim_and_samples(tmp_path):
    r = run_cli("pretrain", "--method", "flow", "--data", "digits", "--image-size", "16", "--batch-size", "256",
                "--levels", "2", "--steps", "1", "--hidden", "16", "--num-samples", "16", "--max-epochs", "1",
                "--no-online-probe", "--name", "f", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "f"
    with (run / "metrics.csv").open(newline="") as f:
        bpd = [float(row["val/bits_per_dim"]) for row in csv.DictReader(f) if row.get("val/bits_per_dim")]
    assert len(bpd) == 1 and 0 < bpd[0] < 8.5
    assert (run / "samples" / "epoch_000.png").stat().st_size > 100
    enc = selfsup.load_encoder(run / "export")
    with torch.no_grad():
        assert enc(torch.rand(2, 3, 16, 16)).shape == (2, enc.num_features)
    assert "samples in runs/f/samples" in r.stdout


def test_cli_names_a_backbone_given_to_a_flow_in_one_line(tmp_path, monkeypatch, capsys):
    from selfsup.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--method", "flow", "--backbone", "cifar_resnet18", "--image-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsup: error: a flow has no backbone") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["pretrain", "--method", "flow", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "unused by a flow (its encoder is the flow itself)" in help_text and "--sample-temperature" in help_text
    assert "--dequantization" in help_text
    assert main(["pretrain", "--method", "flow", "--dequantization", "learned", "--image-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsup: error: dequantization must be 'uniform' or 'variational'") and err.count("\n") == 1


def test_variational_dequantizer_log_q_is_the_change_of_variables_density():
    """log q(u | x) equals torch.distributions' density of sigmoid(N(mu, exp(s)^2)) at the u it draws."""
    from torch.distributions import Normal, TransformedDistribution
    from torch.distributions.transforms import SigmoidTransform

    deq = _away_from_identity(VariationalDequantizer(3, hidden=8), scale=0.1)
    x = torch.rand(4, 3, 4, 4) - 0.5
    eps = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        u, log_q = deq(x, eps)
        mu, log_scale = deq.net(x).chunk(2, dim=1)
        assert log_scale.std() > 0.01  # a non-trivial q: the scale varies by pixel
        ref = TransformedDistribution(Normal(mu.double(), log_scale.double().exp()), SigmoidTransform())
        expected = ref.log_prob(u.double()).flatten(1).sum(1)
    assert ((u > 0) & (u < 1)).all()
    torch.testing.assert_close(log_q.double(), expected, rtol=1e-4, atol=1e-3)


def test_variational_dequantizer_is_a_density_on_the_bin():
    """q is a density on the unit cube, so E_q[log q] = KL(q || uniform) >= 0 (a wrong log-Jacobian breaks it),
    and the flow's variational bound is then no lower than the uniform one when p is flat inside a bin."""
    torch.manual_seed(0)
    deq = _away_from_identity(VariationalDequantizer(3, hidden=8), scale=0.1)
    x = torch.rand(1, 3, 2, 2).expand(20000, -1, -1, -1) - 0.5
    with torch.no_grad():
        _, log_q = deq(x)
    mean, sem = log_q.mean().item(), log_q.std().item() / math.sqrt(len(log_q))
    assert mean > 3 * sem  # KL > 0 here: q is far from uniform

    torch.manual_seed(0)
    model = Flow(levels=1, steps=1, hidden=8, dequantization="variational", flip=False)
    model.dequantizer = deq
    with torch.no_grad():
        model.flow(torch.rand(512, 3, 2, 2) - 0.5)  # actnorm's data-dependent init on spread-out images
    model.eval()
    images = torch.randint(0, 256, (8, 3, 2, 2), dtype=torch.uint8).repeat(2000, 1, 1, 1)
    with torch.no_grad():
        variational = model.bits_per_dim(images)[0].mean()
        model.dequantizer = None
        uniform = model.bits_per_dim(images)[0].mean()
    assert variational > uniform


def test_variational_dequantizer_starts_close_to_uniform():
    """At initialisation q is the logistic-normal nearest to uniform: E_q[log q] = KL(q || U) is about 0.01
    nats a dimension (0.19 with a unit scale), whatever the image."""
    torch.manual_seed(0)
    deq = VariationalDequantizer(3, hidden=8)
    with torch.no_grad():
        u, log_q = deq(torch.rand(2000, 3, 4, 4) - 0.5)
    per_dim = log_q.mean().item() / 48
    assert 0 < per_dim < 0.015
    with torch.no_grad():  # a unit scale instead (the zero-initialised layer alone): 0.19 nats = 0.28 bits
        deq.net[-1].bias.zero_()
        _, log_q = deq(torch.rand(2000, 3, 4, 4) - 0.5)
    assert abs(log_q.mean().item() / 48 - 0.193) < 0.01
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.01  # uniform: 1/2, 1/12


def test_variational_dequantization_trains_with_the_flow():
    """One step on a fixed batch lowers the variational bound and moves q's parameters; the probed
    encoder does not include q, and a bad choice is one ConfigError."""
    torch.manual_seed(0)
    model = Flow(levels=2, steps=1, hidden=16, flip=False, dequantization="variational")
    before_q = [p.detach().clone() for p in model.dequantizer.parameters()]
    loss = model.loss
    model.loss = lambda batch: (torch.manual_seed(0), loss(batch))[1]  # the same noise both times
    before, after = loss_before_and_after_one_step(model, fixed_batch())
    assert after < before
    assert any(not torch.equal(a, b) for a, b in zip(before_q, model.dequantizer.parameters(), strict=True))
    assert not any(n.startswith("dequantizer") for n, _ in model.encoder().named_parameters())
    with pytest.raises(ConfigError, match="dequantization must be"):
        Flow(dequantization="learned")
