import itertools

import pytest
import torch

from selfsup.errors import ConfigError
from selfsup.pretext.patches import TileGrid, cut_tiles
from selfsup.pretext.relative_position import NEIGHBOURS, RelativePosition, patch_pairs
from tests.conftest import fixed_batch


def seeded_loss_before_and_after_one_step(model, batch):
    """Like conftest's helper, with the task's random labels/jitter/colour drops replayed by a fixed seed."""
    opt = model.build_optimizer(model.parameters())
    model.train()
    torch.manual_seed(1)
    before = model.loss(batch)["loss"]
    opt.zero_grad()
    before.backward()
    opt.step()
    torch.manual_seed(1)
    return float(before.detach()), float(model.loss(batch)["loss"].detach())


def test_default_grids_follow_the_image_size():
    assert (TileGrid.for_image(32).patch, TileGrid.for_image(32).gap, TileGrid.for_image(32).jitter) == (7, 1, 2)
    assert (TileGrid.for_image(16).patch, TileGrid.for_image(16).gap, TileGrid.for_image(16).jitter) == (4, 1, 0)
    assert (TileGrid.for_image(224).patch, TileGrid.for_image(224).gap, TileGrid.for_image(224).jitter) == (52, 7, 15)


def test_hand_placed_pair_gets_its_label():
    # 32 px: cells of 10 px from pixel 1; un-jittered 7 px tiles sit 1 px into each cell's 3 px of slack,
    # so the top-right tile covers rows 2..8 and columns 22..28.
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 5, 25] = 1.0  # a marker in the top-right tile only
    x[0, 0, 15, 15] = 2.0  # and one in the centre tile
    grid = TileGrid.for_image(32)
    for k in range(8):
        pairs, labels = patch_pairs(x, grid, labels=torch.tensor([k]), random=False)
        assert labels.tolist() == [k]
        assert pairs[0, 0].max() == 2.0  # the centre tile comes first
        assert (pairs[0, 1].max() == 1.0) == (k == 2)  # only label 2 (top-right) holds the marker
    pairs, _ = patch_pairs(x, grid, labels=torch.tensor([2]), random=False)
    torch.testing.assert_close(pairs[0, 1], x[0, :, 2:9, 22:29])


def test_labels_name_the_neighbour_direction():
    # label k is the k-th non-centre cell row-major: its offset from the centre in cells
    offsets = [(c // 3 - 1, c % 3 - 1) for c in NEIGHBOURS]
    assert offsets == [(dr, dc) for dr, dc in itertools.product((-1, 0, 1), repeat=2) if (dr, dc) != (0, 0)]


def test_cut_tiles_matches_naive_slicing():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    grid = TileGrid.for_image(32)
    origins = grid.origins(4, "cpu")
    tiles = cut_tiles(x, origins, grid.patch)
    assert tiles.shape == (4, 9, 3, 7, 7)
    for b, t in itertools.product(range(4), range(9)):
        r, c = origins[b, t].tolist()
        torch.testing.assert_close(tiles[b, t], x[b, :, r : r + 7, c : c + 7])


@pytest.mark.parametrize("size", [16, 32, 64, 96, 224])
def test_tiles_never_overlap_and_keep_their_gap(size):
    grid = TileGrid.for_image(size)
    # every pixel of an image has its own id: the nine tiles must not share one
    ids = torch.arange(size * size, dtype=torch.float64).view(1, 1, size, size).expand(64, 1, -1, -1)
    origins = grid.origins(64, "cpu")
    tiles = cut_tiles(ids, origins, grid.patch).flatten(1)  # (64, 9 * p * p)
    assert all(len(set(row.tolist())) == row.numel() for row in tiles)
    # and any two tiles are at least `gap` pixels apart along one axis, inside the image
    assert origins.min() >= 0 and origins.max() + grid.patch <= size
    d = (origins[:, :, None] - origins[:, None, :]).abs().amax(-1)  # (64, 9, 9) Chebyshev distance of corners
    off_diag = ~torch.eye(9, dtype=torch.bool)
    assert (d[:, off_diag] >= grid.patch + grid.gap).all()


def test_one_step_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = RelativePosition(backbone="convnet_small", optimizer="adamw", lr=1e-3, crop_scale=1.0, flip=False)
    before, after = seeded_loss_before_and_after_one_step(model, fixed_batch(size=32))
    assert after < before


def test_patch_resize_and_a_too_large_patch():
    model = RelativePosition(backbone="convnet_small", patch_resize=12)
    assert model.loss(fixed_batch(n=4, size=32))["loss"].ndim == 0
    with pytest.raises(ConfigError, match="do not fit"):
        RelativePosition(backbone="convnet_small", patch_size=10).loss(fixed_batch(n=4, size=32))


def test_small_tiles_are_upsampled_to_the_backbone_by_default():
    from selfsup.pretext.patches import MIN_TILE, tile_side

    assert (tile_side(7, None), tile_side(22, None), tile_side(7, 0), tile_side(7, 12)) == (MIN_TILE, 22, 7, 12)
    seen = []
    for resize, side in ((None, MIN_TILE), (0, 7)):
        model = RelativePosition(backbone="convnet_small", patch_resize=resize)
        hook = model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
        model.loss(fixed_batch(n=4, size=32))  # 32 px images: 7 px tiles
        hook.remove()
        assert seen.pop() == side
    with pytest.raises(ConfigError, match="patch_resize must be >= 0"):
        RelativePosition(backbone="convnet_small", patch_resize=-1)
