import numpy as np
import pytest
import torch

from selfsup.errors import ConfigError
from selfsup.eval.knn import knn_classify, knn_predict, knn_scores


def random_split(n_train=300, n_test=120, d=16, c=7, seed=0):
    rng = np.random.default_rng(seed)
    tx = rng.normal(size=(n_train, d)).astype(np.float32)
    vx = rng.normal(size=(n_test, d)).astype(np.float32)
    return tx, rng.integers(0, c, n_train), vx, rng.integers(0, c, n_test)


def brute_force_ranking(tx, ty, vx, k, temperature, c):
    """Reference: numpy argsort of the full cosine matrix, the documented tie rule, one row at a time."""
    a = tx / np.linalg.norm(tx, axis=1, keepdims=True)
    q = vx / np.linalg.norm(vx, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ a.T.astype(np.float64)
    ranks = []
    for row in sims:
        nn = np.argsort(-row, kind="stable")[:k]
        s, lab = row[nn], ty[nn]
        if temperature is None:
            votes = np.bincount(lab, minlength=c)
            sim_sum = np.bincount(lab, weights=s, minlength=c)
            ranks.append(sorted(range(c), key=lambda j: (-votes[j], -sim_sum[j], j)))
        else:
            w = np.bincount(lab, weights=np.exp(s / temperature), minlength=c)
            ranks.append(sorted(range(c), key=lambda j: (-w[j], j)))
    return np.array(ranks)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("temperature", [None, 0.07])
@pytest.mark.parametrize("k", [5, 20])
def test_predictions_equal_brute_force(k, temperature, backend):
    tx, ty, vx, vy = random_split()
    ref = brute_force_ranking(tx, ty, vx, k, temperature, 7)
    pred = knn_predict(tx, ty, vx, k, temperature, backend=backend).numpy()
    np.testing.assert_array_equal(pred, ref[:, 0])
    res = knn_classify(tx, ty, vx, vy, k, temperature, backend=backend, batch_size=50)
    assert res["top1"] == pytest.approx(100 * (ref[:, 0] == vy).mean())
    assert res["top5"] == pytest.approx(100 * (ref[:, :5] == vy[:, None]).any(1).mean())
    assert res["k"] == k and res["temperature"] == temperature


def test_majority_tie_goes_to_larger_summed_similarity_then_smaller_class():
    # query (1, 0); neighbours: class 1 at cos 0.9, class 0 at cos 0.8, class 2 at cos -1.
    tx = np.array([[0.8, 0.6], [0.9, np.sqrt(1 - 0.81)], [-1.0, 0.0]], dtype=np.float32)
    ty = np.array([0, 1, 2])
    vx = np.array([[1.0, 0.0]], dtype=np.float32)
    assert knn_predict(tx, ty, vx, k=2).tolist() == [1]  # one vote each: higher similarity wins
    scores, classes = knn_scores(tx, ty, vx, k=2)
    assert classes.tolist() == [0, 1, 2]
    assert torch.argsort(scores[0], descending=True, stable=True).tolist() == [1, 0, 2]
    # exact tie (identical neighbours of two classes): the smaller class index wins
    tx2 = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    assert knn_predict(tx2, np.array([5, 3, 4]), vx, k=2).tolist() == [3]


def test_weighted_scores_are_summed_exp_similarity():
    tx, ty, vx, _ = random_split(n_train=50, n_test=3, d=4, c=3, seed=1)
    scores, _ = knn_scores(tx, ty, vx, k=50, temperature=0.5)
    a = tx / np.linalg.norm(tx, axis=1, keepdims=True)
    q = vx / np.linalg.norm(vx, axis=1, keepdims=True)
    expected = np.exp(q @ a.T / 0.5) @ np.eye(3)[ty]
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


def test_separable_clusters_and_options():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    ty, vy = np.repeat(np.arange(3), 40), np.repeat(np.arange(3), 10)
    tx = (centres[ty] + rng.normal(size=(120, 8))).astype(np.float32)
    vx = (centres[vy] + rng.normal(size=(30, 8))).astype(np.float32)
    res = knn_classify(torch.from_numpy(tx), torch.from_numpy(ty), vx, vy, k=10)
    assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["n_train"] == 120 and res["n_test"] == 30
    wide = knn_classify(tx, ty, vx, vy, k=10, num_classes=6)
    assert wide["top1"] == 100.0
    scores, classes = knn_scores(tx, ty, vx, k=10, num_classes=6)
    assert scores.shape == (30, 6) and classes.tolist() == list(range(6))


def test_bad_input_errors():
    tx, ty, vx, vy = random_split(n_train=40, n_test=10, d=4, c=3)
    with pytest.raises(ConfigError, match="40 feature rows but 39 labels"):
        knn_classify(tx, ty[:-1], vx, vy)
    with pytest.raises(ConfigError, match="dims"):
        knn_classify(tx, ty, vx[:, :2], vy)
    bad = vx.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ConfigError, match="NaN or inf"):
        knn_classify(tx, ty, bad, vy)
    with pytest.raises(ConfigError, match="no training sample"):
        knn_classify(tx[ty != 1], ty[ty != 1], vx, np.array([1] * 10))
    with pytest.raises(ConfigError, match="larger than the 40 training samples"):
        knn_classify(tx, ty, vx, vy, k=41)
    with pytest.raises(ConfigError, match="positive integer"):
        knn_classify(tx, ty, vx, vy, k=0)
    with pytest.raises(ConfigError, match="temperature"):
        knn_classify(tx, ty, vx, vy, temperature=0.0)
    with pytest.raises(ConfigError, match="backend"):
        knn_classify(tx, ty, vx, vy, backend="annoy")


def test_streamed_chunks_rows_and_float16_equal_brute_force(monkeypatch):
    """The training rows streamed in 3-row chunks (heaps merged), a row subset, float16 storage."""
    import selfsup.eval.knn as knn

    tx, ty, vx, vy = random_split(n_train=100, n_test=40)
    rows = np.arange(0, 100, 2)
    ref = brute_force_ranking(tx[rows], ty[rows], vx, 7, None, 7)
    monkeypatch.setattr(knn, "_DB_FLOATS", 3 * tx.shape[1])
    for backend in ("faiss", "torch"):
        scores, classes = knn_scores(tx, ty, vx, 7, num_classes=7, backend=backend, train_rows=rows)
        np.testing.assert_array_equal(classes[scores.argmax(1)].numpy(), ref[:, 0])
    half = tx.astype(np.float16)
    ref16 = brute_force_ranking(half.astype(np.float32), ty, vx, 5, 0.07, 7)
    res = knn_classify(half, ty, vx, vy, 5, 0.07, num_classes=7, backend="torch")
    assert res["feature_dtype"] == "float16"
    assert res["top1"] == pytest.approx(100 * (ref16[:, 0] == vy).mean())
