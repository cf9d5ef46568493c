import json
import math

import pytest
import torch
from torch import nn

import selfsup
from selfsup.errors import ConfigError
from selfsup.ssl.generative.common import (
    ConvDecoder,
    PixelLikelihood,
    bits_per_dim,
    discretized_logistic_log_prob,
    logistic_mixture_log_prob,
)
from selfsup.ssl.generative.vae import VAE, gaussian_kl, negative_elbo
from tests.conftest import fixed_batch, loss_before_and_after_one_step, perturb_, run_cli


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(5, 7), torch.randn(5, 7)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(5, 7), torch.ones(5, 7))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected)


@pytest.mark.parametrize(("mean", "log_scale"), [(0.0, -2.0), (0.3, -7.0), (0.999, -7.0), (-3.0, 1.0), (8.0, -7.0),
                                                 (0.0, 5.0), (2 * 37 / 255 - 1, -9.0)])
def test_discretized_logistic_sums_to_one_over_256_values(mean, log_scale):
    values = torch.arange(256)
    lp = discretized_logistic_log_prob(values, torch.tensor(mean, dtype=torch.float64),
                                       torch.tensor(log_scale, dtype=torch.float64))
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-9, rtol=0)
    # against the naive CDF difference, where that is accurate (no bin far out in a tail)
    s = math.exp(log_scale)
    centre = 2 * values.double() / 255 - 1
    cdf = lambda t: torch.sigmoid((t - mean) / s)  # noqa: E731
    naive = torch.where(values == 0, cdf(centre + 1 / 255),
                        torch.where(values == 255, 1 - cdf(centre - 1 / 255), cdf(centre + 1 / 255) - cdf(centre - 1 / 255)))
    ok = naive > 1e-6
    torch.testing.assert_close(lp[ok].exp(), naive[ok], rtol=1e-6, atol=0)


def test_logistic_mixture_sums_to_one_and_has_finite_gradients():
    torch.manual_seed(0)
    k = 3
    params = (torch.randn(1, 3 * k, 1, 1) * 4).requires_grad_()  # (B, 3K*C, H, W) with C = 1
    values = torch.arange(256).view(256, 1, 1, 1)  # every value of one subpixel
    lp = logistic_mixture_log_prob(values, params.expand(256, -1, -1, -1), k)
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    lp.sum().backward()
    assert torch.isfinite(params.grad).all()


def test_bits_per_dim_units():
    # a uniform distribution over 256 values costs exactly 8 bits per subpixel
    assert float(bits_per_dim(torch.tensor(3 * 32 * 32 * math.log(256)), 3 * 32 * 32)) == pytest.approx(8.0)


def _exact_log_likelihood(images, decode, log_prob, grid):
    """log p(x) = log of the integral of p(x|z) N(z; 0, 1) dz over a 1-D latent, by the trapezoid-free Riemann sum."""
    dz = grid[1] - grid[0]
    params = decode(grid[:, None])  # (G, ...)
    n, g = images.shape[0], grid.shape[0]
    lik = log_prob(images.repeat_interleave(g, 0), params.repeat(n, *[1] * (params.ndim - 1))).view(n, g)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(grid)  # (G,)
    return torch.logsumexp(lik + prior, dim=1) + torch.log(dz)  # (N,)


def _moments(images, decode, log_prob, grid):
    """Mean and log-variance of the exact posterior p(z|x) on the grid."""
    params = decode(grid[:, None])
    n, g = images.shape[0], grid.shape[0]
    lik = log_prob(images.repeat_interleave(g, 0), params.repeat(n, *[1] * (params.ndim - 1))).view(n, g)
    w = torch.softmax(lik + torch.distributions.Normal(0.0, 1.0).log_prob(grid), dim=1)  # (N, G)
    mean = (w * grid).sum(1)
    var = (w * (grid - mean[:, None]) ** 2).sum(1)
    return mean[:, None], var.log()[:, None]


@pytest.mark.parametrize("kind", ["bernoulli", "logistic"])
@torch.no_grad()
def test_elbo_is_below_the_exact_log_likelihood_of_an_enumerable_toy(kind):
    """Every 2x2 binary image (Bernoulli) or every value of a 1-pixel 8-bit image (logistic), 1-D latent."""
    torch.manual_seed(0)
    if kind == "bernoulli":
        bits = torch.tensor([[(i >> j) & 1 for j in range(4)] for i in range(16)])
        images = (bits * 255).to(torch.uint8).view(16, 1, 2, 2)
        out_shape = (1, 2, 2)
    else:
        images = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
        out_shape = (3, 1, 1)  # logit, mean, log-scale of one logistic
    likelihood = PixelLikelihood(kind, channels=1)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, math.prod(out_shape)))

    def decode(z):
        return net(z).view(-1, *out_shape)

    grid = torch.linspace(-9, 9, 3001)
    log_px = _exact_log_likelihood(images, decode, likelihood.log_prob, grid)
    torch.testing.assert_close(log_px.exp().sum(), torch.tensor(1.0), atol=1e-4, rtol=0)  # a distribution over x

    n = images.shape[0]
    posteriors = {"random": (torch.randn(n, 1), torch.randn(n, 1) - 1),
                  "moment-matched": _moments(images, decode, likelihood.log_prob, grid)}
    for name, (mean, logvar) in posteriors.items():
        nll, kl = negative_elbo(images, mean, logvar, decode, likelihood.log_prob, samples=2000)
        elbo = -(nll + kl)
        assert (elbo <= log_px + 0.02).all(), (name, (elbo - log_px).max())
        if name == "moment-matched":  # a near-exact posterior makes the bound nearly tight
            assert (log_px - elbo).mean() < 0.1, (log_px - elbo).mean()
        else:
            assert (log_px - elbo).mean() > 0.1


@pytest.mark.parametrize("size", [7, 16, 28, 32])
def test_decoder_output_shape(size):
    dec = ConvDecoder(latent_dim=5, out_chans=9, image_size=size, width=8)
    assert dec(torch.randn(2, 5)).shape == (2, 9, size, size)


@pytest.mark.parametrize("likelihood", ["logistic", "bernoulli"])
def test_one_step_lowers_loss_on_fixed_batch(likelihood):
    torch.manual_seed(0)
    model = VAE(backbone="convnet_small", image_size=16, likelihood=likelihood, logistic_components=2,
                decoder_width=16, flip=False)
    before, after = loss_before_and_after_one_step(model, fixed_batch())
    assert after < before


@pytest.mark.parametrize("probe_features", ["mean", "backbone"])
def test_export_round_trip_reproduces_encode(tmp_path, probe_features):
    torch.manual_seed(0)
    model = VAE(backbone="convnet_small", image_size=16, latent_dim=12, decoder_width=8, probe_features=probe_features)
    perturb_(model)
    model.eval()
    x = torch.rand(4, 3, 16, 16)
    model.export(tmp_path)
    enc = selfsup.load_encoder(tmp_path)
    assert torch.equal(enc(x), model.encode(x))
    expected = 12 if probe_features == "mean" else model.backbone.num_features
    assert enc.num_features == model.num_features == expected == model.encode(x).shape[1]
    assert json.loads((tmp_path / "config.json").read_text())["hparams"]["probe_features"] == probe_features
    if probe_features == "mean":  # the posterior mean, not the backbone features
        feats = model.backbone(model.normalize(x))
        torch.testing.assert_close(enc(x), model.posterior(feats)[:, :12])


def test_bad_options_are_config_errors():
    for kw in ({"likelihood": "mse"}, {"probe_features": "z"}, {"latent_dim": 0}, {"beta": -1.0}):
        with pytest.raises(ConfigError, match=repr(next(iter(kw.values())))):
            VAE(backbone="convnet_small", image_size=16, **kw)


@pytest.mark.slow
def test_cli_pretrains_on_digits_and_reports_bits_per_dim(tmp_path):
    r = run_cli("pretrain", "--method", "vae", "--backbone", "convnet_small", "--data", "digits", "--image-size", "16",
                "--batch-size", "256", "--max-epochs", "1", "--no-online-probe", "--decoder-width", "16",
                "--name", "v", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "v"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["val/bits_per_dim"] < 10  # an untrained 8-bit model is near 8; far above means wrong units
    png = run / "samples" / "epoch_000.png"
    assert png.is_file() and "runs/v/samples" in r.stdout
    from PIL import Image

    with Image.open(png) as im:  # 4 rows of 8 tiles of 16 px, 1 px padding
        assert im.size == (8 * 17 + 1, 4 * 17 + 1)
