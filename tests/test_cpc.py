import math

import pytest
import torch

import selfsup
from selfsup.errors import ConfigError
from selfsup.pretext.task import TASKS
from selfsup.ssl.backbone import Backbone
from selfsup.ssl.cpc import CPC, DIRECTIONS, CPCTask, PatchAugment, default_patch_grid, patchify
from selfsup.ssl.losses import GridInfoNCE
from selfsup.ssl.module import Normalize
from tests.conftest import fixed_batch, loss_before_and_after_one_step, perturb_


def _naive_grid_info_nce(preds, targets, offsets, directions):
    """Explicit loops: the positive of preds[r, k, b, i, j] is targets[b, (i, j) + k * step_r]."""
    r_n, k_n, b_n, gh, gw, _ = preds.shape
    candidates = [targets[bb, ii, jj] for bb in range(b_n) for ii in range(gh) for jj in range(gw)]
    per_pair = []
    for r, (dr, dc) in enumerate(directions):
        for kk, k in enumerate(offsets):
            losses = []
            for b in range(b_n):
                for i in range(gh):
                    for j in range(gw):
                        ti, tj = i + k * dr, j + k * dc
                        if not (0 <= ti < gh and 0 <= tj < gw):
                            continue
                        logits = torch.stack([preds[r, kk, b, i, j] @ c for c in candidates])
                        positive = b * gh * gw + ti * gw + tj
                        losses.append(torch.logsumexp(logits, 0) - logits[positive])
            per_pair.append(torch.stack(losses).mean())
    return torch.stack(per_pair).mean()


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("directions", [((1, 0),), ((1, 0), (-1, 0), (0, 1), (0, -1))])
def test_grid_info_nce_matches_naive_reference(chunk_size, directions):
    g = torch.Generator().manual_seed(0)
    offsets = (1, 2)
    preds = torch.randn(len(directions), 2, 2, 4, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(2, 4, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    loss, acc = GridInfoNCE(offsets, directions, chunk_size=chunk_size)(preds, targets)
    expected = _naive_grid_info_nce(preds, targets, offsets, directions)
    torch.testing.assert_close(loss, expected)
    assert 0 <= acc <= 1 and not acc.requires_grad
    grads = torch.autograd.grad(loss, (preds, targets))
    expected_grads = torch.autograd.grad(expected, (preds, targets))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def _model(**kw):
    kw = {"backbone": "convnet_small", "image_size": 32, **kw}
    return CPC(**kw)


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_context_and_predictions_are_causal(direction):
    torch.manual_seed(0)
    model = _model(directions=direction, context_blocks=2, context_hidden=16).eval()
    g = model.geometry.grid
    z = torch.randn(2, g, g, model.num_features)
    preds, _ = model.task.predict(z)
    dr, dc = DIRECTIONS[direction]
    pos = torch.arange(g)
    progress = pos[:, None] * dr + pos[None, :] * dc  # (G, G): how far along the direction a position is
    for line in progress.unique()[:-1].tolist():
        ahead = progress > line  # positions the context of `line` must not see
        z2 = z.clone()
        z2[:, ahead] += torch.randn_like(z2[:, ahead])
        preds2, _ = model.task.predict(z2)
        assert torch.equal(preds2[:, :, :, ~ahead], preds[:, :, :, ~ahead])
        assert not torch.equal(preds2[:, :, :, ahead], preds[:, :, :, ahead])


def test_pixels_below_a_row_do_not_reach_its_context():
    torch.manual_seed(0)
    model = _model(context_blocks=2, context_hidden=16).eval()
    x = torch.rand(2, 3, 32, 32)
    enc = model.encoder()

    def preds_of(images):
        return model.task.predict(enc.patch_features(model.normalize(images)))[0]

    base = preds_of(x)
    geo = model.geometry
    for i in range(geo.grid - 1):
        first_unseen_pixel = i * geo.stride + geo.patch  # row i's patches end here
        x2 = x.clone()
        x2[:, :, first_unseen_pixel:] = torch.rand_like(x2[:, :, first_unseen_pixel:])
        got = preds_of(x2)
        assert torch.equal(got[..., : i + 1, :, :], base[..., : i + 1, :, :])
        assert not torch.equal(got[..., i + 1 :, :, :], base[..., i + 1 :, :, :])


def _fixed_batch(n=8, size=32):
    return fixed_batch(n, size)


def test_loss_at_init_is_log_of_candidates():
    torch.manual_seed(0)
    model = _model()
    batch = _fixed_batch()
    out = model.loss(batch)
    n_candidates = 8 * model.geometry.grid**2
    assert abs(out["loss"].item() - math.log(n_candidates)) < 0.05 * math.log(n_candidates)
    assert out["features"].shape == (8, model.num_features) and not out["features"].requires_grad


def test_one_step_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = _model(
        lr=1e-3, crop_scale=1.0, flip=False, patch_color_drop=0.0, patch_flip=0.0, context_blocks=2, context_hidden=32
    )
    before, after = loss_before_and_after_one_step(model, _fixed_batch())
    assert after < before


def test_export_load_encoder_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = _model(image_size=16, context_blocks=1)
    perturb_(model)
    model.eval()
    x = torch.rand(3, 3, 16, 16)
    expected = model.encode(x)
    assert expected.shape == (3, model.num_features)
    model.export(tmp_path)
    enc = selfsup.load_encoder(tmp_path)
    assert enc.config["method"] == "cpc" and enc.num_features == model.num_features
    with torch.no_grad():
        assert torch.equal(enc(x), expected)
        # another image size is fitted to the training size first
        assert enc(torch.rand(2, 3, 24, 20)).shape == (2, model.num_features)


@pytest.mark.parametrize(
    ("size", "patch", "stride", "grid"),
    [
        (32, 8, 4, 7),
        (64, 16, 8, 7),
        (96, 16, 8, 11),
        (224, 64, 32, 6),
        (256, 64, 32, 7),
        (16, 4, 2, 7),
        (128, 32, 16, 7),
    ],
)
def test_patch_grid_defaults(size, patch, stride, grid):
    assert default_patch_grid(size) == (patch, stride)
    assert patchify(torch.zeros(1, 3, size, size), patch, stride).shape == (1, grid, grid, 3, patch, patch)


def test_patchify_is_row_major():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    grid = patchify(x, 2, 2)  # (1, 2, 2, 1, 2, 2)
    assert grid[0, 0, 1, 0].tolist() == [[2, 3], [6, 7]]
    assert grid[0, 1, 0, 0].tolist() == [[8, 9], [12, 13]]


def test_misspelt_or_bad_options_fail():
    with pytest.raises(TypeError):
        _model(patch_sise=8)
    with pytest.raises(ConfigError, match="directions"):
        _model(directions="down,sideways")
    with pytest.raises(ConfigError, match="max_offset"):
        _model(max_offset=7)
    with pytest.raises(ConfigError, match="patch_size"):
        _model(patch_size=40)
    with pytest.raises(ConfigError, match="patch_flip"):
        _model(patch_flip=1.5)


def test_skip_overlap_offsets():
    assert _model().geometry.offsets == (2, 3, 4, 5)  # 8 px patches at stride 4: offset 1 overlaps
    assert _model(skip_overlap=False).geometry.offsets == (1, 2, 3, 4, 5)


def test_patch_augment_is_independent_per_patch():
    torch.manual_seed(0)
    patch = torch.randn(3, 4, 4)
    patches = patch.expand(256, 3, 4, 4).clone()
    out = PatchAugment(color_drop=1.0, flip=0.5)(patches)
    flipped = (out == patch.flip(-1)).flatten(2).all(2)  # (256, 3): channel kept and flipped
    kept = (out == patch).flatten(2).all(2) | flipped  # (256, 3): channel kept
    assert (kept.sum(1) == 1).all()  # exactly one channel survives per patch
    kept_channel = kept.float().argmax(1)
    assert len(kept_channel.unique()) == 3  # patches drew different channels
    assert 0.3 < flipped.any(1).float().mean() < 0.7  # and different flips
    dropped = out[~kept]  # the dropped channels are small noise
    assert dropped.abs().max() < 0.1 and dropped.std() > 0
    assert torch.equal(PatchAugment(color_drop=0.0, flip=0.0)(patches), patches)


def _gather_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(1, 2, 4, 4, 4, 8, generator=g, dtype=torch.float64)
    targets = torch.randn(4, 4, 4, 8, generator=g, dtype=torch.float64)
    local = slice(2 * rank, 2 * rank + 2)  # each rank holds 2 of the 4 images
    p, t = preds[:, :, local].clone().requires_grad_(), targets[local].clone().requires_grad_()
    loss, _ = GridInfoNCE((1, 2), gather_negatives=True)(p, t)
    loss.backward()
    torch.save({"loss": loss.detach(), "p": p.grad, "t": t.grad}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gather_negatives_matches_one_process_on_the_whole_batch(tmp_path):
    """Two gloo ranks with half the batch each give the whole batch's loss and (DDP-averaged) gradients."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(1, 2, 4, 4, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(4, 4, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    loss, _ = GridInfoNCE((1, 2))(preds, targets)
    loss.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach())
    # DDP averages gradients over the 2 ranks
    torch.testing.assert_close(torch.cat([r["p"] for r in ranks], dim=2) / 2, preds.grad)
    torch.testing.assert_close(torch.cat([r["t"] for r in ranks]) / 2, targets.grad)


def test_patch_augment_on_lightness_patches_only_flips():
    torch.manual_seed(0)
    patches = torch.randn(256, 1, 4, 4)
    out = PatchAugment(color_drop=1.0, flip=0.5)(patches)
    flipped = (out == patches.flip(-1)).flatten(1).all(1)  # (256,); random patches are never symmetric
    assert ((out == patches).flatten(1).all(1) | flipped).all()  # no channel dropped, no noise
    assert 0.3 < flipped.float().mean() < 0.7


class _Spy(torch.nn.Module):
    """A backbone wrapper that records the shapes of its inputs."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.num_features, self.shapes = backbone, backbone.num_features, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.backbone(x)


def test_cpc_task_from_the_registry_cuts_the_grid_of_the_images_it_is_given():
    torch.manual_seed(0)
    backbone = _Spy(Backbone("convnet_small", norm="layer"))
    task = TASKS["cpc"](backbone.num_features, 3)  # from the name alone, as multitask builds it
    assert isinstance(task, CPCTask) and task.predictor_offsets == (1, 2, 3, 4, 5)
    for size, patch in ((32, 8), (16, 4)):  # no resizing: the geometry of each batch's own size
        x = fixed_batch(4, size)[0].float() / 255
        out = task(x, backbone, Normalize())
        assert set(out) == {"loss", "cpc_acc", "features"} and out["features"].shape == (4, backbone.num_features)
        assert backbone.shapes[-1] == (4 * 7 * 7, 3, patch, patch)  # 7x7 grid at stride patch / 2
        assert abs(out["loss"].item() - math.log(4 * 49)) < 0.05 * math.log(4 * 49)
    out["loss"].backward()
    grads = task.predictors.grad.flatten(1).abs().sum(1)  # (K_all,)
    assert grads[0] == 0 and (grads[1:] > 0).all()  # offset 1 overlaps the context row: skipped, no gradient
    with pytest.raises(ConfigError, match="max_offset"):  # 5 px: 1 px patches, a 5x5 grid: no room for offset 5
        task(torch.rand(2, 3, 5, 5), backbone, Normalize())
    with pytest.raises(ConfigError, match="square"):
        task(torch.rand(2, 3, 32, 24), backbone, Normalize())


def test_cpc_method_is_its_task_and_nothing_else():
    """The same seed builds the same weights, and the method's loss and gradients are the bare task's."""
    kw = {"context_blocks": 2, "context_hidden": 32}
    torch.manual_seed(0)
    model = _model(crop_scale=1.0, flip=False, **kw).train()
    torch.manual_seed(0)
    backbone = Backbone("convnet_small", norm="layer")
    task = CPCTask(backbone.num_features, 3, image_size=32, **kw).train()
    assert set(model.state_dict()) == {f"backbone.{k}" for k in backbone.state_dict()} | {
        f"task.{k}" for k in task.state_dict()
    }
    for k, v in task.state_dict().items():
        assert torch.equal(model.state_dict()[f"task.{k}"], v), k
    images = fixed_batch(8, 32)[0]
    torch.manual_seed(1)
    got = model.loss((images, None))
    torch.manual_seed(1)
    want = task(images.float() / 255, backbone, Normalize())
    for k in ("loss", "cpc_acc", "features"):
        assert torch.equal(got[k], want[k]), k
    got["loss"].backward()
    want["loss"].backward()
    assert torch.equal(model.task.predictors.grad, task.predictors.grad)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.backbone.parameters(), backbone.parameters(), strict=True))
