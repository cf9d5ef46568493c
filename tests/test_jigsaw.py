import numpy as np
import pytest
import torch

from selfsup.errors import ConfigError
from selfsup.pretext.jigsaw import (
    Jigsaw,
    JigsawTask,
    all_permutations,
    permutation_set,
    shuffle_tiles,
    to_grayscale,
)
from selfsup.pretext.patches import cut_tiles, normalize_tiles
from selfsup.ssl.module import Normalize
from tests.conftest import fixed_batch
from tests.test_relative_position import seeded_loss_before_and_after_one_step


def pairwise_hamming(perms: np.ndarray) -> np.ndarray:
    return (perms[:, None, :] != perms[None, :, :]).sum(-1)  # (P, P)


def test_permutation_set_is_deterministic_and_keeps_its_promise():
    perms, promise = permutation_set(100)
    permutation_set.cache_clear()
    again, promise_again = permutation_set(100)
    np.testing.assert_array_equal(perms, again)
    assert promise == promise_again
    assert perms.shape == (100, 9)
    assert (np.sort(perms, axis=1) == np.arange(9)).all()  # each row is a permutation of the 9 tiles
    d = pairwise_hamming(perms)
    np.fill_diagonal(d, 99)
    assert d.min() == promise == 6  # distinct, and at least 6 of 9 tiles move between any two
    assert permutation_set(10)[0].shape == (10, 9)
    assert not np.array_equal(permutation_set(10, seed=1)[0], permutation_set(10)[0])


def test_each_added_permutation_is_the_farthest_from_those_before():
    perms, _ = permutation_set(5)
    everything = all_permutations()
    for k in range(1, 5):
        # brute force: every permutation's distance to the nearest of the first k chosen ones
        nearest = (everything[:, None, :] != perms[None, :k, :]).sum(-1).min(1)  # (9!,)
        assert (perms[k] != perms[:k]).sum(-1).min() == nearest.max()


def test_bad_permutation_count():
    with pytest.raises(ConfigError, match="num_permutations"):
        permutation_set(1)


def test_shuffle_tiles_places_and_inverts():
    tiles = torch.arange(2 * 9, dtype=torch.float32).view(2, 9, 1, 1, 1)
    perms = torch.from_numpy(permutation_set(100)[0])
    labels = torch.tensor([3, 57])
    shuffled = shuffle_tiles(tiles, perms, labels)
    for b in range(2):
        order = perms[labels[b]]
        assert shuffled[b, :, 0, 0, 0].tolist() == tiles[b, order, 0, 0, 0].tolist()
        inverse = torch.argsort(order)
        torch.testing.assert_close(shuffled[b, inverse], tiles[b])


def test_one_step_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = Jigsaw(backbone="convnet_small", optimizer="adamw", lr=1e-3, crop_scale=1.0, flip=False)
    before, after = seeded_loss_before_and_after_one_step(model, fixed_batch(size=32))
    assert after < before


def test_mean_selection_is_the_papers_algorithm_1():
    perms, promise = permutation_set(5, selection="mean")
    everything = all_permutations()
    for k in range(1, 5):
        # brute force: every permutation's summed distance to the first k chosen ones; chosen ones excluded
        total = (everything[:, None, :] != perms[None, :k, :]).sum(-1).sum(1)  # (9!,)
        chosen = (everything[:, None, :] == perms[None, :k, :]).all(-1).any(1)
        assert (perms[k] != perms[:k]).sum() == total[~chosen].max()
    d = pairwise_hamming(perms)
    np.fill_diagonal(d, 99)
    assert promise == d.min()


def test_the_two_selections_trade_closest_pair_for_mean_distance():
    iu = np.triu_indices(100, 1)
    maxmin, low_maxmin = permutation_set(100, selection="maxmin")
    mean, low_mean = permutation_set(100, selection="mean")
    assert (low_maxmin, low_mean) == (6, 2)  # the figures
    assert pairwise_hamming(mean)[iu].mean() > pairwise_hamming(maxmin)[iu].mean()
    with pytest.raises(ConfigError, match="permutation_selection"):
        permutation_set(10, selection="max")


def test_normalize_tiles_gives_each_channel_of_each_tile_mean_0_std_1():
    g = torch.Generator().manual_seed(0)
    scale = 0.2 + 5 * torch.rand(4, 9, 3, 1, 1, generator=g)  # contrast differs by tile and channel
    tiles = torch.rand(4, 9, 3, 6, 6, generator=g) * scale + torch.randn(4, 9, 3, 1, 1, generator=g)
    tiles[0, 0, 1] = 0.7  # a constant channel: no spread to normalise
    out = normalize_tiles(tiles)
    mean, std = out.mean((-2, -1)), out.std((-2, -1), unbiased=False)
    assert torch.equal(out[0, 0, 1], torch.zeros(6, 6))
    keep = torch.ones_like(mean, dtype=torch.bool)
    keep[0, 0, 1] = False
    torch.testing.assert_close(mean[keep], torch.zeros_like(mean[keep]), atol=1e-5, rtol=0)
    torch.testing.assert_close(std[keep], torch.ones_like(std[keep]), atol=1e-4, rtol=0)


def test_cut_tiles_shifts_each_channel_by_its_own_offset():
    x = torch.arange(2 * 3 * 12 * 12, dtype=torch.float32).view(2, 3, 12, 12)
    origins = torch.tensor([[[2, 3], [5, 5]], [[4, 1], [0, 6]]])  # (B=2, T=2, 2)
    assert torch.equal(cut_tiles(x, origins, 4, torch.zeros(2, 2, 3, 2, dtype=torch.long)), cut_tiles(x, origins, 4))
    shift = torch.randint(-2, 3, (2, 2, 3, 2))
    out = cut_tiles(x, origins, 4, shift)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for b in range(2):
        for t in range(2):
            for c in range(3):
                r, q = (origins[b, t] + shift[b, t, c] + 2).tolist()
                assert torch.equal(out[b, t, c], padded[b, c, r:r + 4, q:q + 4])


def test_grayscale_makes_the_chosen_images_grey():
    x = torch.rand(6, 3, 8, 8)
    assert torch.equal(to_grayscale(x, 0.0), x)
    g = to_grayscale(x, 1.0)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    torch.testing.assert_close(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])


def _gradient_images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Images whose brightness and contrast change smoothly across them: low-level statistics place a tile."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    angle = torch.rand(n, 1, 1, generator=g) * 0.5  # mostly left-to-right ramps
    ramp = torch.cos(angle) * xx + torch.sin(angle) * yy  # (n, S, S)
    noise = torch.rand(n, 3, size, size, generator=g) * (0.1 + 0.5 * ramp[:, None])  # contrast grows too
    return (0.6 * ramp[:, None] + noise).clamp(0, 1)


def _shortcut_probe_accuracy(task: JigsawTask, images: torch.Tensor) -> float:
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(0)
    with torch.no_grad():
        tiles, labels = task.puzzles(images, Normalize())
        seen = task.backbone_tiles(tiles).view(tiles.shape[0], 9, 3, -1)  # (B, 9, C, p'*p'), the backbone's input
    feats = torch.cat([seen.mean((-2, -1)), seen.std((-2, -1))], 1).numpy()  # (B, 18): each tile's mean, std
    cut = len(feats) * 3 // 4
    clf = LogisticRegression(max_iter=500).fit(feats[:cut], labels[:cut].numpy())
    return float((clf.predict(feats[cut:]) == labels[cut:].numpy()).mean())


def test_tile_statistics_no_longer_solve_the_puzzle():
    images = _gradient_images(1200)
    guarded = JigsawTask(8, num_permutations=10).train()
    unguarded = JigsawTask(8, num_permutations=10, tile_norm=False, channel_jitter=0, grayscale=0.0).train()
    assert _shortcut_probe_accuracy(unguarded, images) > 0.5  # the probe sees the shortcut when it is there
    assert _shortcut_probe_accuracy(guarded, images) < 0.2  # chance is 0.1


def test_multitask_jigsaw_normalises_its_tiles():
    from selfsup.pretext.multitask import MultiTask

    model = MultiTask(tasks="jigsaw,rotation", backbone="convnet_small").train()
    task = model.tasks["jigsaw"]
    assert task.tile_norm and task.grayscale == 0.3
    tiles, _ = task.puzzles(torch.rand(4, 3, 32, 32), model.normalize)
    seen = task.backbone_tiles(tiles)
    torch.testing.assert_close(seen.mean((-2, -1)), torch.zeros(seen.shape[:2]), atol=1e-5, rtol=0)
