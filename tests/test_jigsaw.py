import numpy as np
import pytest
import torch

from selfsup.errors import ConfigError
from selfsup.pretext.jigsaw import Jigsaw, all_permutations, permutation_set, shuffle_tiles
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
