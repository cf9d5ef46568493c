import csv

import pytest
import torch
import torch.nn.functional as F

import selfsup
from selfsup.errors import ConfigError
from selfsup.pretext.exemplar import Exemplar, ExemplarTask, triplet_loss
from selfsup.pretext.multitask import MultiTask
from tests.conftest import fixed_batch, run_cli


def naive_triplet(z: torch.Tensor, ids: torch.Tensor, margin: float, mining: str) -> torch.Tensor:
    """Loops over every (anchor, positive) and negative: the loss as the docstring states it."""
    n = len(z)
    terms = []
    for a in range(n):
        for p in range(n):
            if a == p or ids[a] != ids[p]:
                continue
            d_ap = ((z[a] - z[p]) ** 2).sum()
            d_neg = [((z[a] - z[q]) ** 2).sum() for q in range(n) if ids[q] != ids[a]]
            if mining == "all":
                terms += [F.relu(d_ap - d_an + margin) for d_an in d_neg]
            else:
                farther = [d for d in d_neg if d > d_ap]
                chosen = min(farther) if farther else max(d_neg)
                terms.append(F.relu(d_ap - chosen + margin))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("mining", ["semihard", "all"])
@pytest.mark.parametrize("copies", [2, 3])
def test_triplet_loss_matches_a_naive_loop(mining, copies):
    torch.manual_seed(copies)
    b = 5
    # near-duplicate views, so positives are close and some negatives fall inside the margin
    base = torch.randn(b, 6)
    z = F.normalize(base.repeat(copies, 1) + 0.6 * torch.randn(copies * b, 6), dim=1).double()
    ids = torch.arange(b).repeat(copies)
    z.requires_grad_(True)
    got, _ = triplet_loss(z, ids, margin=0.5, mining=mining)
    want = naive_triplet(z, ids, 0.5, mining)
    torch.testing.assert_close(got, want)
    g_got, = torch.autograd.grad(got, z)
    g_want, = torch.autograd.grad(naive_triplet(z, ids, 0.5, mining), z)
    torch.testing.assert_close(g_got, g_want)
    assert 0 < float(got.detach())  # the case exercises the hinge


@pytest.mark.parametrize("mining", ["semihard", "all"])
def test_two_ranks_anchors_against_gathered_candidates_average_to_the_whole_batch_loss(mining):
    # what gather_negatives computes under DDP: each rank's rows as anchors, every rank's rows as candidates
    torch.manual_seed(0)
    b, copies = 6, 2
    z = F.normalize(torch.randn(b, 5).repeat(copies, 1) + 0.8 * torch.randn(copies * b, 5), dim=1)
    ids = torch.arange(b).repeat(copies)
    whole, _ = triplet_loss(z, ids, 0.5, mining)
    half = len(z) // 2
    ranks = [triplet_loss(z[r * half:(r + 1) * half], ids[r * half:(r + 1) * half], 0.5, mining,
                          candidates=(z, ids, r * half))[0] for r in range(2)]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, whole)
    local = (triplet_loss(z[:half], ids[:half], 0.5, mining)[0] + triplet_loss(z[half:], ids[half:], 0.5, mining)[0]) / 2
    assert not torch.allclose(local, whole)  # the comparison sees the missing negatives


@pytest.mark.parametrize("mining", ["semihard", "all"])
def test_loss_is_zero_for_identical_views_of_distinct_images_and_high_when_swapped(mining):
    b, copies = 4, 2
    z = torch.eye(b).repeat(copies, 1)  # every view of image i is e_i: d_ap = 0, d_an = 2 > margin
    ids = torch.arange(b).repeat(copies)
    loss, acc = triplet_loss(z, ids, margin=0.5, mining=mining)
    assert float(loss) == 0.0 and float(acc) == 1.0
    # the second views shifted by one image: each positive is now as far as a negative, one is identical
    z_bad = torch.cat([torch.eye(b), torch.eye(b).roll(1, 0)])
    loss_bad, acc_bad = triplet_loss(z_bad, ids, margin=0.5, mining=mining)
    assert float(loss_bad) >= 0.5 and float(acc_bad) == 0.0


@pytest.mark.parametrize("mining", ["semihard", "all"])
def test_views_of_the_anchors_own_image_are_never_negatives(mining):
    # image 0 has three views: a and q identical, p a little away; image 1's views are opposite (distance 4).
    # Were q a negative for the pair (a, p), d_aq = 0 < d_ap would give a positive hinge.
    e = torch.tensor([1.0, 0.0])
    p = F.normalize(torch.tensor([1.0, 0.2]), dim=0)
    z = torch.stack([e, p, e, -e, -e, -e])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, acc = triplet_loss(z, ids, margin=0.5, mining=mining)
    assert float(loss) == 0.0 and float(acc) == 1.0


def test_views_are_per_image_augmentations_laid_out_by_copy():
    task = ExemplarTask(8, copies=3).train()
    x = torch.rand(4, 3, 16, 16)
    views, ids = task.views(x)
    assert views.shape == (12, 3, 16, 16) and ids.tolist() == [0, 1, 2, 3] * 3
    assert not torch.allclose(views[0], views[4])  # two views of image 0 differ
    assert torch.equal(task.eval().views(x)[0][4], x[0])  # without augmentation: the image itself


def test_gradients_reach_the_backbone_through_the_loss():
    torch.manual_seed(0)
    model = Exemplar(backbone="convnet_small")
    out = model.loss(fixed_batch(8, 16))
    out["loss"].backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert set(out) == {"loss", "exemplar_acc"}  # no features: views are not the images the probe encodes


def test_bad_options_and_batches_are_one_clear_error():
    for kw, msg in (({"copies": 1}, "copies"), ({"mining": "hard"}, "mining"), ({"margin": 0}, "margin"),
                    ({"crop_min": 0}, "crop_min"), ({"grayscale": 2}, "grayscale")):
        with pytest.raises(ConfigError, match=msg):
            Exemplar(backbone="convnet_small", **kw)
    with pytest.raises(ConfigError, match="at least 2 images"):
        Exemplar(backbone="convnet_small").loss(fixed_batch(1, 16))


def test_doersch_zisserman_combination_takes_a_step():
    torch.manual_seed(0)
    model = MultiTask(backbone="convnet_small", tasks="relative_position,colorization,exemplar")
    assert model.backbone.in_chans == 1  # colorization makes every task see lightness, as in the paper
    opt = model.build_optimizer(model.parameters())
    out = model.loss(fixed_batch(8, 32))
    assert {"relative_position_loss", "colorization_loss", "exemplar_loss", "exemplar_acc"} <= set(out)
    opt.zero_grad()
    out["loss"].backward()
    assert model.tasks["exemplar"].embed.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.isfinite(model.loss(fixed_batch(8, 32))["loss"])


@pytest.mark.slow
def test_cli_pretrains_exemplar_on_digits(tmp_path):
    r = run_cli("pretrain", "--method", "exemplar", "--backbone", "convnet_small", "--data", "digits",
                "--image-size", "16", "--batch-size", "32", "--max-steps", "3", "--copies", "3", "--mining", "all",
                "--no-online-probe", "--log-every-n-steps", "1", "--name", "e", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "e"
    with (run / "metrics.csv").open(newline="") as f:
        acc = [float(row["train/exemplar_acc"]) for row in csv.DictReader(f) if row.get("train/exemplar_acc")]
    assert len(acc) == 3 and all(0 <= a <= 1 for a in acc)
    enc = selfsup.load_encoder(run / "export")
    assert enc.config["method"] == "exemplar"
    with torch.no_grad():
        assert enc(torch.rand(2, 3, 16, 16)).shape == (2, enc.num_features)
