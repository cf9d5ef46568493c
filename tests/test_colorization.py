import math

import numpy as np
import pytest
import torch
from kornia.color import lab_to_rgb, rgb_to_lab
from PIL import Image

import selfsup
from selfsup.errors import ConfigError
from selfsup.eval import harness
from selfsup.pretext.colorization import (
    Colorization,
    ColorizationTask,
    colorization_grid,
    pick_across_classes,
)
from selfsup.pretext.lab import (
    annealed_mean,
    gamut_bins,
    rebalance_weights,
    rebalanced_cross_entropy,
    smooth_prior,
    soft_encode,
)
from selfsup.pretext.task import TASKS
from tests.conftest import fixed_batch, loss_before_and_after_one_step, perturb_, run_cli


def _lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3) colours -> (N, 3) Lab through kornia."""
    return rgb_to_lab(rgb.T.reshape(1, 3, -1, 1))[0, :, :, 0].T


def _cie_lab(rgb: np.ndarray) -> np.ndarray:
    """Naive reference: sRGB (IEC 61966-2-1) -> XYZ -> CIE Lab, D65 white, float64."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def test_lab_round_trip():
    torch.manual_seed(0)
    rgb = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb), clip=False), rgb, atol=1e-3, rtol=0)


def test_lab_reference_values():
    # sRGB primaries, white, black, mid grey, yellow: D65 values as tabled by B. Lindbloom's calculator
    rgb = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0], [0.5, 0.5, 0.5], [1, 1, 0]], dtype=torch.float64)
    want = torch.tensor([[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793], [32.2970, 79.1875, -107.8602],
                         [100, 0, 0], [0, 0, 0], [53.3890, 0, 0], [97.1393, -21.5537, 94.4780]], dtype=torch.float64)
    torch.testing.assert_close(_lab(rgb), want, atol=0.01, rtol=0)
    # and random colours against the CIE formulas written out
    rand = torch.rand(500, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_lab(rand).double(), torch.from_numpy(_cie_lab(rand.double().numpy())), atol=2e-3, rtol=0)


def test_gamut_bins_cover_srgb_and_nothing_else():
    bins = gamut_bins()
    assert bins.shape == (262, 2)  # the sRGB footprint on the grid-10 ab plane (the paper's 313: see gamut_bins)
    assert torch.equal(bins, torch.round(bins / 10) * 10) and len(torch.unique(bins, dim=0)) == len(bins)
    assert bins.min(0).values.tolist() == [-90, -110] and bins.max(0).values.tolist() == [100, 90]
    # every sRGB colour's nearest grid point is a bin ...
    rgb = torch.cat([torch.rand(20000, 3, generator=torch.Generator().manual_seed(0)),
                     torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float32)])
    nearest = torch.round(_lab(rgb)[:, 1:] / 10) * 10
    assert (torch.cdist(nearest, bins).min(1).values == 0).all()
    # ... and every bin's cell holds an sRGB colour at some lightness (checked the other way, Lab -> RGB)
    off = torch.linspace(-5, 5, 6)
    cell = torch.stack(torch.meshgrid(off, off, indexing="ij"), -1).reshape(-1, 2)  # (36, 2), corners included
    ab = (bins[:, None] + cell[None]).reshape(-1, 2)  # (Q * 36, 2)
    lightness = torch.arange(1.0, 100.0, 2.0)
    lab = torch.cat([lightness[:, None, None].expand(-1, len(ab), 1), ab[None].expand(len(lightness), -1, -1)], 2)
    rgb = lab_to_rgb(lab.permute(2, 0, 1)[None], clip=False)[0]  # (3, L, Q * 36)
    inside = ((rgb > -0.01) & (rgb < 1.01)).all(0).any(0).reshape(len(bins), -1).any(1)
    assert inside.all(), bins[~inside]


def test_soft_encoding_sums_to_one_on_the_nearest_bins():
    bins = gamut_bins()
    ab = torch.tensor([[0.0, 0.0], [13.0, -27.0], [-80.3, 61.2]])
    idx, w = soft_encode(ab, bins)
    assert idx.shape == w.shape == (3, 5)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    d = torch.cdist(ab, bins)
    assert torch.equal(torch.sort(d.gather(1, idx), 1).values, torch.sort(d, 1).values[:, :5])
    assert (w[:, :-1] >= w[:, 1:]).all()  # nearer bins weigh more
    # at a bin centre: the centre and its 4 neighbours at distance 10, Gaussian sigma 5
    centre = 1 / (1 + 4 * math.exp(-100 / 50))
    torch.testing.assert_close(w[0], torch.tensor([centre] + [centre * math.exp(-2)] * 4))
    assert bins[idx[0, 0]].tolist() == [0.0, 0.0]


def test_rebalancing_weights_follow_the_formula():
    q = 262
    p = torch.rand(q, generator=torch.Generator().manual_seed(0)) ** 4
    p = p / p.sum()
    w = rebalance_weights(p, 0.5)
    naive = torch.tensor([1 / (0.5 * float(pi) + 0.5 / q) for pi in p])
    torch.testing.assert_close(w, naive / (naive * p).sum())
    torch.testing.assert_close((p * w).sum(), torch.tensor(1.0))  # E_p[w] = 1
    assert w[p.argmin()] == w.max() and w[p.argmax()] == w.min()  # rare colours weigh more
    torch.testing.assert_close(rebalance_weights(p, 1.0), torch.ones(q))  # lambda 1: no rebalancing
    torch.testing.assert_close(rebalance_weights(torch.zeros(q)), torch.ones(q))  # nothing seen yet
    with pytest.raises(ConfigError):
        rebalance_weights(p, 0.0)


def test_smoothed_prior_spreads_a_bin_to_its_neighbours():
    bins = gamut_bins()
    i = int(torch.cdist(torch.zeros(1, 2), bins).argmin())
    delta = torch.zeros(len(bins))
    delta[i] = 1
    s = smooth_prior(delta, bins)
    torch.testing.assert_close(s.sum(), torch.tensor(1.0))
    neighbour = int(torch.cdist(torch.tensor([[10.0, 0.0]]), bins).argmin())
    torch.testing.assert_close(s[neighbour] / s[i], torch.tensor(math.exp(-100 / 50)))


def test_annealed_mean_between_mean_and_mode():
    bins = gamut_bins()
    logits = torch.randn(4, len(bins), generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(annealed_mean(logits, bins, 1.0), torch.softmax(logits, 1) @ bins)
    mode = bins[logits.argmax(1)]
    torch.testing.assert_close(annealed_mean(logits, bins, 1e-3), mode)
    mid = annealed_mean(logits, bins, 0.38)
    assert ((mid - mode).norm(dim=1) < (annealed_mean(logits, bins, 1.0) - mode).norm(dim=1)).all()


def test_rebalanced_cross_entropy_against_dense_reference():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    idx = torch.randint(0, 10, (6, 3), generator=torch.Generator().manual_seed(1))
    target = torch.softmax(torch.randn(6, 3), 1)
    pw = torch.rand(6)
    dense = torch.zeros(6, 10).scatter_add_(1, idx, target)
    want = (pw * -(dense * torch.log_softmax(logits, 1)).sum(1)).mean()
    torch.testing.assert_close(rebalanced_cross_entropy(logits, idx, target, pw), want)


@pytest.mark.parametrize("loss", ["ce", "l2"])
def test_one_step_lowers_loss_on_fixed_batch(loss):
    torch.manual_seed(0)
    model = Colorization(backbone="convnet_small", loss=loss, lr=1e-4, crop_scale=1.0, flip=False)
    before, after = loss_before_and_after_one_step(model, fixed_batch())
    assert after < before


def test_prior_is_a_running_mean_of_training_histograms():
    torch.manual_seed(0)
    model = Colorization(backbone="convnet_small", crop_scale=1.0, flip=False)
    task = model.task
    assert model.backbone.in_chans == 1 and TASKS["colorization"] is ColorizationTask and ColorizationTask.in_chans == 1
    hists = []
    for seed in (0, 1):
        images = fixed_batch(seed=seed)[0]
        ab = torch.nn.functional.adaptive_avg_pool2d(rgb_to_lab(images.float() / 255)[:, 1:], 4)  # (16, 2, 4, 4)
        nearest = soft_encode(ab.permute(0, 2, 3, 1).reshape(-1, 2), task.bins)[0][:, 0]
        hists.append(torch.bincount(nearest, minlength=len(task.bins)).float() / nearest.numel())
        model.train()
        out = model.loss((images, None))
        assert 0 <= float(out["colorization_acc"]) <= 1
    torch.testing.assert_close(task.prior, (hists[0] + hists[1]) / 2)
    assert float(task.prior_batches) == 2
    model.eval()
    model.loss(fixed_batch(seed=2))
    assert float(task.prior_batches) == 2  # validation never updates it
    keys = model.state_dict().keys()
    assert "task.prior" in keys and "task.bins" not in keys  # checkpointed; the bins are recomputed


def test_colorize_keeps_lightness_and_decodes_ab():
    model = Colorization(backbone="convnet_small")
    grey = torch.rand(2, 1, 16, 16).expand(-1, 3, -1, -1)
    with torch.no_grad():
        out_conv = model.task.decoder.out
        out_conv.weight.zero_()
        out_conv.bias.fill_(-10)
        out_conv.bias[int(torch.cdist(torch.zeros(1, 2), model.task.bins).argmin())] = 10  # all mass on ab = (0, 0)
    torch.testing.assert_close(model.colorize(grey), grey, atol=1e-3, rtol=0)
    with torch.no_grad():
        out_conv.bias.zero_()
        out_conv.bias[int(torch.cdist(torch.tensor([[40.0, 30.0]]), model.task.bins).argmin())] = 10
    lab = rgb_to_lab(model.colorize(torch.full((1, 3, 8, 8), 0.5)))
    torch.testing.assert_close(lab[0, 1:, 4, 4], torch.tensor([40.0, 30.0]), atol=0.5, rtol=0)
    assert model.training  # colorize restores the mode


def test_l2_variant_predicts_ab_directly():
    model = Colorization(backbone="convnet_small", loss="l2")
    assert model.task.decoder.out.out_channels == 2
    with pytest.raises(ConfigError):
        Colorization(backbone="convnet_small", loss="l1")


def test_grid_png_has_three_labelled_rows(tmp_path):
    images = torch.rand(3, 3, 16, 16)
    path = colorization_grid(images, images, tmp_path / "c" / "epoch_000.png")
    picture = np.asarray(Image.open(path).convert("L"))
    h, w = picture.shape
    grid_w = 2 + 3 * (64 + 2)  # 3 images a row, upscaled to 64 px, 2 px padding
    assert h == 2 + 3 * (64 + 2) and w > grid_w  # 3 rows (grey, prediction, truth), a label column left of them
    labels = picture[:, : w - grid_w]
    for r in range(3):  # each row's band of the label column has dark (text) pixels
        assert (labels[2 + r * 66 : 2 + (r + 1) * 66] < 100).any()


def test_grid_images_are_picked_across_classes():
    picked = []
    first = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    assert pick_across_classes(picked, first, torch.tensor([0, 0, 0, 1, 1, 1]), n=4) == [0, 3]
    second = 10 + first
    assert pick_across_classes(picked, second, torch.tensor([1, 2, 2, 3, 4, 5]), n=4) == [1, 3]
    assert [label for label, _ in picked] == [0, 1, 2, 3]  # one image of each class, in the order met
    assert [int(image[0, 0, 0]) for _, image in picked] == [0, 3, 11, 13]


def test_export_round_trip_exact_and_floor_is_lightness(tmp_path):
    torch.manual_seed(0)
    model = Colorization(backbone="convnet_small")
    perturb_(model)
    model.eval()
    x = torch.rand(4, 3, 16, 16)
    enc = selfsup.load_encoder(model.export(tmp_path / "export"))
    assert torch.equal(enc(x), model.encode(x))  # takes RGB, converts to L itself
    twin = harness.resolve_source(str(tmp_path / "export")).random_twin()
    assert twin.backbone.in_chans == 1  # the random-init floor is an L-input encoder too


@pytest.mark.slow
def test_cli_pretrains_on_digits(tmp_path):
    r = run_cli("pretrain", "--method", "colorization", "--backbone", "convnet_small", "--data", "digits",
                "--image-size", "16", "--batch-size", "256", "--max-epochs", "1", "--name", "c", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "c"
    assert (run / "colorization" / "epoch_000.png").is_file()
    enc = selfsup.load_encoder(run / "export")
    assert enc(torch.rand(2, 3, 16, 16)).shape == (2, 128)
