"""A class's label subset depends on its label, the seed and the dataset, never on the other classes.

The planted bug this catches: seeding each class's permutation by the class's *position* among the
labels present instead of by its label. Removing the first class shifts every position.
"""

import numpy as np
import pytest

from selfsup.eval.label_efficiency import subset_indices


def _per_class(labels, idx):
    return {int(c): sorted(int(i) for i in idx if labels[i] == c) for c in np.unique(labels[idx])}


@pytest.mark.parametrize("budget", [{"k": 3}, {"percent": 30.0}])
def test_removing_other_classes_does_not_change_a_class_subset(budget):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 300)
    full = _per_class(labels, subset_indices(labels, seed=1, dataset_key="toy", **budget))
    # Drop class 0 (every other class moves one position down) and relabel nothing else.
    keep = np.flatnonzero(labels != 0)
    sub = labels[keep]
    part = subset_indices(sub, seed=1, dataset_key="toy", **budget)
    got = {c: sorted(int(keep[i]) for i in idxs) for c, idxs in _per_class(sub, part).items()}
    for c in range(1, 6):
        assert got[c] == full[c], c


def test_seeds_and_datasets_give_other_subsets():
    labels = np.repeat(np.arange(4), 50)
    a = subset_indices(labels, k=5, seed=0, dataset_key="toy")
    assert not np.array_equal(a, subset_indices(labels, k=5, seed=1, dataset_key="toy"))
    assert not np.array_equal(a, subset_indices(labels, k=5, seed=0, dataset_key="other"))
    assert np.array_equal(a, subset_indices(labels, k=5, seed=0, dataset_key="toy"))
