"""Gated PixelCNN: the causal mask (subpixels, colours included) by gradients, bits/dim against a brute-force
chain-rule sum, exact sampling, the stage interface of its encoder, and a CLI run on digits."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F

import selfsup
from selfsup.errors import ConfigError
from selfsup.ssl.generative.common import discretized_logistic_log_prob
from selfsup.ssl.generative.pixelcnn import PixelCNN, colour_groups, sample_logistic_mixture, symmetric
from selfsup.ssl.stage_features import StageFeatureEncoder
from tests.conftest import fixed_batch, loss_before_and_after_one_step, run_cli

SIDE = 4


def _tiny(**kw) -> PixelCNN:
    torch.manual_seed(0)
    args = {"layers": 5, "hidden": 9, "kernel": 3, "first_kernel": 3, "logistic_components": 2} | kw
    return PixelCNN(**args).double()


def test_each_conditional_sees_exactly_the_earlier_subpixels():
    """d out(i) / d x(j) is exactly zero for j >= i in raster order, R -> G -> B within a pixel, for the mixture
    parameters and for every stage's features of i's colour; and non-zero for every j < i in the last stage: no
    blind spot (the original PixelCNN's misses the pixels up and to the right). The non-zero check reads the
    stage, before the head, whose ReLUs can silence a path for an input; the gates' derivatives never vanish."""
    model = _tiny()
    k, groups = model.hparams.logistic_components, colour_groups(model.hparams.hidden)
    x = torch.rand(2, 3, SIDE, SIDE, dtype=torch.float64, requires_grad=True)
    last, stages = model.net.forward_intermediates(x)
    params = model.net.head(last)  # (B, 9K, H, W), colour-major
    order = torch.arange(3 * SIDE * SIDE).view(SIDE, SIDE, 3).permute(2, 0, 1)  # (C, H, W): raster order
    for i in range(3 * SIDE * SIDE):
        r, c, ch = i // (3 * SIDE), i // 3 % SIDE, i % 3
        later = order >= i
        outs = [params[:, ch * 3 * k : (ch + 1) * 3 * k, r, c]] + [s[:, groups == ch, r, c] for s in stages]
        for j, out in enumerate(outs):  # images are independent: one sum for the batch
            (grad,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
            seen = grad.ne(0).any(0)  # (C, H, W)
            assert not seen[later].any(), f"{'params' if j == 0 else f'layer{j}'} of subpixel {i} sees later ones"
        assert seen[~later].all(), f"subpixel {i} is blind to {(~seen & ~later).nonzero().tolist()}"


def _naive_pmf(logits, mean, log_scale):
    """The 256 probabilities of a discretised logistic mixture, bin by bin, from the logistic's CDF."""
    edges = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None]  # bin centres (256, 1)
    upper = torch.where(edges < 1, torch.sigmoid((edges + 1 / 255 - mean) / log_scale.clamp(min=-7).exp()), 1.0)
    lower = torch.where(edges > -1, torch.sigmoid((edges - 1 / 255 - mean) / log_scale.clamp(min=-7).exp()), 0.0)
    return ((upper - lower) * torch.softmax(logits, 0)).sum(1)  # (256, K) -> (256,)


def test_bits_per_dim_equals_a_brute_force_chain_rule_sum():
    """-sum_i log2 p(x_i | x_<i) / D, each conditional from its own pass with every later subpixel replaced by
    noise and its probability read off a naive 256-bin table, is the model's bits/dim."""
    model = _tiny()
    k = model.hparams.logistic_components
    images = fixed_batch(2, 3)[0]
    expected = model.bits_per_dim(images)[0]
    g = torch.Generator().manual_seed(1)
    for b in range(2):
        nll = torch.zeros((), dtype=torch.float64)
        for i in range(3 * 3 * 3):
            r, c, ch = i // 9, i // 3 % 3, i % 3
            seen = images[b : b + 1].clone()
            noise = torch.randint(0, 256, seen.shape, generator=g, dtype=torch.uint8)
            later = (torch.arange(27).view(3, 3, 3).permute(2, 0, 1) >= i)[None]  # (1, C, H, W) raster order >= i
            seen[later] = noise[later]
            with torch.no_grad():
                p = model.net(symmetric(seen, torch.float64))[0, :, r, c].view(3, 3, k)[ch]  # (3, K)
            pmf = _naive_pmf(*p)
            assert abs(float(pmf.sum()) - 1) < 1e-9
            nll -= torch.log(pmf[images[b, ch, r, c].long()])
        torch.testing.assert_close(expected[b], nll / (27 * math.log(2)), rtol=1e-9, atol=1e-9)


def test_sampling_draws_the_discretised_mixture_exactly():
    g = torch.Generator().manual_seed(0)
    params = torch.tensor([[0.0, 1.0], [-0.97, 0.9], [math.log(0.05), math.log(0.1)]])  # logits, means, log-scales
    draws = sample_logistic_mixture(params.expand(200_000, 3, 2), g)
    freq = torch.bincount(draws, minlength=256).double() / len(draws)
    values = torch.arange(256)[:, None]
    exact = torch.logsumexp(discretized_logistic_log_prob(values, params[1].double(), params[2].double())
                            + F.log_softmax(params[0].double(), 0), dim=1).exp()
    assert (freq - exact).abs().max() < 3e-3 and freq[0] > 0 and freq[255] > 0  # the tails land in the edge bins


def test_sampling_s_incremental_passes_give_the_full_pass_conditionals():
    """Per row, the vertical stack on the rows_seen rows above; per subpixel, the horizontal stack on the row's
    columns up to the current one: the same parameters as one pass of the whole network over the image."""
    model = _tiny(layers=3)
    x = symmetric(torch.randint(0, 256, (2, 3, 9, 5), dtype=torch.uint8), torch.float64)
    with torch.no_grad():
        full = model.net(x)
        for r in range(9):
            top = max(0, r - model.net.rows_seen)
            window = x[:, :, top : r + 1].clone()
            window[:, :, -1] = 7.0  # the row being sampled is not read by its context
            context = model.net.row_context(window)
            for c in range(5):
                got = model.net.row_params(x[:, :, r : r + 1, : c + 1], [v[..., : c + 1] for v in context])
                torch.testing.assert_close(got[:, :, 0, c], full[:, :, r, c], rtol=0, atol=1e-12)
    s = model.float().sample(3, (5, 4), seed=0)
    assert s.shape == (3, 3, 5, 4) and torch.equal(s, model.sample(3, (5, 4), seed=0))
    assert torch.equal(s * 255, (s * 255).round()) and s.min() >= 0 and s.max() <= 1


def test_one_step_lowers_the_loss_and_a_loss_is_bits_per_dim():
    model = _tiny().float()
    model.hparams.flip = False  # both losses see the same images
    before, after = loss_before_and_after_one_step(model, fixed_batch(8, 6))
    assert after < before and 7 < before < 12  # random-init conditionals: near uniform's 8 bits


def test_the_encoder_exposes_every_layer_and_pools_the_middle_one():
    model = _tiny(layers=5).float()
    enc = model.encoder().eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        last, stages = enc.forward_intermediates(x)
        assert enc.stage_names == [f"layer{i}" for i in range(1, 6)] and enc.stage_channels == [9] * 5
        assert [tuple(s.shape) for s in stages] == [(2, 9, 8, 8)] * 5 and torch.equal(last, stages[-1])
        torch.testing.assert_close(enc(x), stages[2].mean(dim=(2, 3)))  # layer3 of 5: the middle
        assert enc.num_features == 9 == model.num_features
        torch.testing.assert_close(_tiny(layers=5, probe_layer=5).float().encoder()(x), stages[4].mean(dim=(2, 3)))
        # the spine's reader of every stage (DCGAN's all-layers probe) takes it as it takes a backbone
        allstages = StageFeatureEncoder(enc.backbone, enc.normalize)
        assert allstages(x).shape == (2, 16 * 45) == (2, allstages.num_features)
        # the layer-wise probe's reader (selfsup.eval.layers) sees every layer by name, then the pooled output
        from selfsup.eval.layers import read_stages

        named = read_stages(enc, x)
        assert list(named) == [*enc.stage_names, "out"]
        torch.testing.assert_close(named["layer4"], stages[3])
        torch.testing.assert_close(named["out"], enc(x))
        # online-probe features in the loss are the exported encoder's
        feats = model.loss((torch.rand(2, 3, 8, 8), None))["features"]
        assert feats.shape == (2, 9)


@pytest.mark.parametrize("bad", [{"backbone": "cifar_resnet18"}, {"kernel": 4}, {"first_kernel": 1}, {"hidden": 2},
                                 {"probe_layer": 6}, {"crop_scale": 0.5}, {"norm": "batch"}, {"layers": 0}])
def test_bad_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        PixelCNN(**({"layers": 5} | bad))


@pytest.mark.slow
def test_cli_pretrains_with_bits_per_dim_samples_and_a_stage_exposing_export(tmp_path):
    r = run_cli("pretrain", "--method", "pixelcnn", "--data", "digits", "--image-size", "8", "--batch-size", "128",
                "--layers", "4", "--hidden", "12", "--num-samples", "4", "--max-epochs", "1", "--no-online-probe",
                "--name", "p", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "p"
    with (run / "metrics.csv").open(newline="") as f:
        bpd = [float(row["val/bits_per_dim"]) for row in csv.DictReader(f) if row.get("val/bits_per_dim")]
    assert len(bpd) == 1 and 0 < bpd[0] < 8.5
    assert (run / "samples" / "epoch_000.png").stat().st_size > 100
    assert "pixelcnn: 4 samples of 8x8 took" in r.stdout and "192 sequential passes" in r.stdout
    enc = selfsup.load_encoder(run / "export")
    with torch.no_grad():
        assert enc(torch.rand(2, 3, 8, 8)).shape == (2, 12) and len(enc.forward_intermediates(torch.rand(1, 3, 8, 8))[1]) == 4
