from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from selfsup.errors import ConfigError
from selfsup.eval.linear import check_split, fit_logistic, linear_probe, stratified_holdout


def blobs(n_train, n_test, d, c, sep, seed=0, correlated=False):
    """Gaussian blobs; ``correlated`` mixes the noise so the best classifier is not the centroid one."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(c, d)) * sep
    mix = rng.normal(size=(d, d)) * np.exp(rng.normal(size=d))[:, None] if correlated else np.eye(d)

    def make(n):
        y = np.arange(n) % c
        return (mu[y] + rng.normal(size=(n, d)) @ mix + 3.0).astype(np.float32), y

    return (*make(n_train), *make(n_test))


@pytest.mark.parametrize("sep", [4.0, 0.6], ids=["separable", "overlapping"])
@pytest.mark.parametrize("weight_decay", [1e-3, 1e-1])
def test_fit_logistic_matches_sklearn_at_same_regularisation(sep, weight_decay):
    tx, ty, vx, vy = blobs(400, 400, 10, 4, sep)
    scaler = StandardScaler().fit(tx)
    tx, vx = scaler.transform(tx).astype(np.float32), scaler.transform(vx).astype(np.float32)
    w, b = fit_logistic(tx, ty, weight_decay, max_iter=1000, tol=1e-6)
    ours = torch.softmax(torch.from_numpy(vx) @ w + b, dim=1).numpy()
    ref = LogisticRegression(C=1.0 / (weight_decay * len(ty)), tol=1e-8, max_iter=5000).fit(tx, ty)
    theirs = ref.predict_proba(vx)
    assert np.abs(ours - theirs).max() < 2e-3
    acc_ours = 100 * (ours.argmax(1) == vy).mean()
    assert abs(acc_ours - 100 * ref.score(vx, vy)) <= 0.5
    np.testing.assert_allclose(w.numpy().T, ref.coef_, atol=5e-3 * max(1.0, np.abs(ref.coef_).max()))


@pytest.mark.parametrize("sep", [4.0, 0.6], ids=["separable", "overlapping"])
def test_linear_probe_accuracy_matches_sklearn_at_chosen_c(sep):
    tx, ty, vx, vy = blobs(600, 600, 12, 5, sep, seed=1)
    res = linear_probe(tx, ty, vx, vy)
    scaler = StandardScaler().fit(tx)
    ref = LogisticRegression(C=res["C"], max_iter=5000).fit(scaler.transform(tx), ty)
    assert abs(res["top1"] - 100 * ref.score(scaler.transform(vx), vy)) <= 0.5
    assert res["n_train"] == 600 and res["n_test"] == 600 and res["num_classes"] == 5
    assert res["top5"] == 100.0  # top-5 of 5 classes
    assert res["val_top1"] is not None and res["val_curve"][0]["weight_decay"] == 1.0


def test_regularisation_stronger_on_noisy_high_dim_small_n():
    clean = linear_probe(*blobs(2000, 500, 16, 4, 1.0, seed=0, correlated=True))
    noisy = linear_probe(*blobs(200, 500, 500, 4, 0.08, seed=0))
    assert noisy["weight_decay"] >= 100 * clean["weight_decay"]
    assert clean["top1"] > 90


def test_numpy_torch_and_label_values_agree():
    tx, ty, vx, vy = blobs(300, 200, 8, 3, 1.5, seed=2)
    labels = np.array([3, 7, 10])  # non-contiguous label values
    a = linear_probe(tx, labels[ty], vx, labels[vy], return_model=True)
    b = linear_probe(torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(vx), torch.from_numpy(vy))
    assert a["top1"] == pytest.approx(b["top1"], abs=0.5)
    pred = a["model"].predict(vx).numpy()
    assert set(pred) <= {3, 7, 10}
    assert 100 * (pred == labels[vy]).mean() == pytest.approx(a["top1"])


def test_one_label_per_class_uses_default_strength():
    tx, ty, vx, vy = blobs(3, 90, 8, 3, 3.0, seed=3)
    res = linear_probe(tx, ty, vx, vy, default_weight_decay=1e-2)
    assert res["val_top1"] is None and res["weight_decay"] == 1e-2 and res["top1"] > 60


def test_minibatch_path_close_to_lbfgs():
    tx, ty, vx, vy = blobs(800, 400, 10, 4, 0.8, seed=4)
    full = linear_probe(tx, ty, vx, vy, weight_decays=[1e-3])
    mini = linear_probe(tx, ty, vx, vy, weight_decays=[1e-3], batch_size=128, epochs=40)
    assert abs(full["top1"] - mini["top1"]) <= 2.0
    # the mini-batch path minimises the same objective, to within a few percent
    x, y = torch.from_numpy(StandardScaler().fit_transform(tx)).float(), torch.from_numpy(ty)

    def objective(w, b):
        return float(torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5e-3 * w.square().sum())

    best = objective(*fit_logistic(x, y, 1e-3))
    assert 0.999 * best <= objective(*fit_logistic(x, y, 1e-3, batch_size=128, epochs=40)) <= 1.1 * best


def test_stratified_holdout_keeps_every_class_on_both_sides():
    y = torch.tensor([0] * 10 + [1] * 2 + [2] * 5)
    fit, val = stratified_holdout(y, 0.2, seed=0)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(17))
    assert set(y[fit].tolist()) == set(y[val].tolist()) == {0, 1, 2}
    assert torch.bincount(y[val]).tolist() == [2, 1, 1]
    assert stratified_holdout(torch.tensor([0, 0, 1]), 0.2, seed=0) is None


def test_bad_input_errors():
    tx, ty, vx, vy = blobs(60, 30, 4, 3, 2.0)
    with pytest.raises(ConfigError, match="60 feature rows but 59 labels"):
        linear_probe(tx, ty[:-1], vx, vy)
    with pytest.raises(ConfigError, match="4 dims but test features have 3"):
        linear_probe(tx, ty, vx[:, :3], vy)
    bad = tx.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ConfigError, match="NaN or inf"):
        linear_probe(bad, ty, vx, vy)
    with pytest.raises(ConfigError, match=r"test labels \{2\}.*no training sample"):
        linear_probe(tx[ty < 2], ty[ty < 2], vx, vy)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        linear_probe(tx[ty == 0], ty[ty == 0], vx[vy == 0], vy[vy == 0])
    with pytest.raises(ConfigError, match="integer class labels"):
        linear_probe(tx, ty.astype(np.float32), vx, vy)
    with pytest.raises(ConfigError, match="weight_decays"):
        linear_probe(tx, ty, vx, vy, weight_decays=[0.0])
    with pytest.raises(ConfigError):
        check_split(tx, ty, vx, vy, num_classes=2)


def many_classes(c, n, d, seed=0, n_test=2000):
    """Gaussian classes in ``d`` dims with per-feature scales, overlapping enough that the L2 strength matters."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(c, d)) * 4.8 / np.sqrt(d)
    scale = np.exp(0.3 * rng.normal(size=d))

    def make(m):
        y = np.arange(m) % c
        return (mu[y] + rng.normal(size=(m, d)) * scale).astype(np.float32), y

    return (*make(n), *make(n_test))


@pytest.mark.parametrize("c,n,d,grid", [
    (10, 600, 32, None),
    (100, 2000, 32, None),
    pytest.param(1000, 4000, 32, [1e-2, 1e-3, 1e-4], marks=pytest.mark.slow),
], ids=["10-classes", "100-classes", "1000-classes"])
def test_probe_agrees_with_sklearn_best_c_at_any_class_count(c, n, d, grid):
    """The L2 search on the same hold-out as scikit-learn (tight tol) picks its best C; test top-1 within 0.5 pt."""
    tx, ty, vx, vy = many_classes(c, n, d)
    res = linear_probe(tx, ty, vx, vy, weight_decays=grid, patience=None)
    scaler = StandardScaler().fit(tx)
    sx, svx = scaler.transform(tx), scaler.transform(vx)
    fit, val = (i.numpy() for i in stratified_holdout(torch.from_numpy(ty), 0.2, seed=0))
    sk_val = {}
    for point in res["val_curve"]:
        wd = point["weight_decay"]
        ref = LogisticRegression(C=1.0 / (wd * len(fit)), tol=1e-6, max_iter=3000).fit(sx[fit], ty[fit])
        sk_val[wd] = 100 * ref.score(sx[val], ty[val])
        assert abs(point["val_top1"] - sk_val[wd]) <= 1.0, (wd, point, sk_val[wd])
    best = max(sk_val.values())
    assert sk_val[res["weight_decay"]] >= best - 0.5, (res["weight_decay"], sk_val)
    sk_wd = max(sk_val, key=lambda wd: (sk_val[wd], wd))
    ref = LogisticRegression(C=1.0 / (sk_wd * n), tol=1e-6, max_iter=3000).fit(sx, ty)
    assert abs(res["top1"] - 100 * ref.score(svx, vy)) <= 0.5
    assert res["fit"]["solver"] == "lbfgs" and res["fit"]["converged"]
    # the search picks the strength with the best held-out top-1 (ties: the lower held-out loss)
    assert res["weight_decay"] == max(res["val_curve"], key=lambda p: (p["val_top1"], -p["val_loss"]))["weight_decay"]


def test_warm_started_weak_penalty_fits_move_to_their_own_optimum():
    """A warm start from a strong penalty's solution is not 'converged' for a weak one (scale-free tol)."""
    tx, ty, _, _ = many_classes(100, 1000, 24)
    x = torch.from_numpy(StandardScaler().fit_transform(tx)).float()
    y = torch.from_numpy(ty)

    def objective(w, b, wd):
        return float(torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * wd * w.square().sum())

    strong = fit_logistic(x, y, 1e-2)
    for wd in (1e-3, 1e-4, 1e-5):
        w, b, info = fit_logistic(x, y, wd, init=strong, return_info=True)
        cold = fit_logistic(x, y, wd, tol=1e-6, max_iter=1000)
        assert info.iterations >= 5 and not torch.equal(w, strong[0])
        assert objective(w, b, wd) <= objective(*cold, wd) + 1e-3 * abs(objective(*cold, wd))
        strong = (w, b)


def test_probe_is_the_same_with_one_or_two_threads():
    tx, ty, vx, vy = many_classes(100, 2000, 48, seed=3)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(linear_probe(tx, ty, vx, vy))
    finally:
        torch.set_num_threads(threads)
    one, two = runs
    assert one["weight_decay"] == two["weight_decay"]
    assert abs(one["top1"] - two["top1"]) <= 0.1  # stated tolerance: 2 of 2000 test images
    assert [p["weight_decay"] for p in one["val_curve"]] == [p["weight_decay"] for p in two["val_curve"]]


def test_rows_float16_memmap_and_streaming_give_the_resident_result(tmp_path):
    """A label subset given as row indices of a float16 memory map, streamed chunk by chunk, probes like
    the gathered float32 rows held in memory."""
    tx, ty, vx, vy = many_classes(20, 1200, 24, seed=5)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=tx.shape)
    mm[:] = tx
    mm.flush()
    x16 = np.load(tmp_path / "x.npy", mmap_mode="r")
    rows = np.flatnonzero(np.arange(len(ty)) % 3 != 0)
    ref = linear_probe(x16[rows].astype(np.float32), ty[rows], vx, vy)
    streamed = linear_probe(x16, ty, vx, vy, train_rows=rows, resident_bytes=0)
    assert streamed["feature_dtype"] == "float16" and streamed["n_train"] == len(rows)
    assert streamed["weight_decay"] == ref["weight_decay"]
    assert abs(streamed["top1"] - ref["top1"]) <= 0.5
    for a, b in zip(streamed["val_curve"], ref["val_curve"], strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-3 * b["val_loss"]


def _probe_data(tmp_path):
    """400 x 16 features of 5 overlapping classes (float32; the L2 search picks 0.1, inside the grid), the
    same as a float16 memory map, and a label subset."""
    tx, ty, vx, vy = blobs(400, 300, 16, 5, 0.5, seed=3)
    if not (tmp_path / "x16.npy").is_file():  # the test writes it once, before the ranks start
        mm = np.lib.format.open_memmap(tmp_path / "x16.npy", mode="w+", dtype=np.float16, shape=tx.shape)
        mm[:] = tx
        mm.flush()
    rows = np.flatnonzero(np.arange(len(ty)) % 4 != 1)
    return tx, ty, vx, vy, np.load(tmp_path / "x16.npy", mmap_mode="r"), rows


def _probe_both_ways(tmp_path, shard=None) -> list[dict]:
    """The probe held in memory (all rows), and streamed from the float16 memory map (a label subset).

    Under a shard the in-memory rows (train and test) outside this rank's block are NaN, and the probe runs
    without its global finiteness check: a rank that read another's rows would produce NaN.
    """
    tx, ty, vx, vy, x16, rows = _probe_data(tmp_path)
    if shard is not None:
        for x in (tx, vx):
            lo, hi = shard.bounds(len(x))
            x[:lo], x[hi:] = np.nan, np.nan
    runs = [linear_probe(tx, ty, vx, vy, shard=shard, return_model=True, check_finite=shard is None),
            linear_probe(x16, ty, vx, vy, train_rows=rows, resident_bytes=0, shard=shard, return_model=True)]
    for res in runs:
        model = res.pop("model")
        res["model"] = {k: getattr(model, k) for k in ("mean", "std", "weight", "bias")}
    return runs


def _data_parallel_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    from selfsup.eval.shard import Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    runs = _probe_both_ways(Path(out_dir), Shard.process_group())
    torch.save(runs, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_probe_on_two_ranks_equals_one_process(tmp_path):
    """Two gloo ranks, each reading only its half of the rows: the same strength, hold-out curve and
    accuracies as one process, standardisation and weights equal within float32 rounding (the stated
    tolerance: weights within 1e-5), and both ranks hold the same bits."""
    import torch.multiprocessing as mp

    _probe_data(tmp_path)  # writes the memory map the ranks read
    mp.spawn(_data_parallel_worker, args=(2, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _probe_both_ways(tmp_path)
    finally:
        torch.set_num_threads(threads)
    for one, (r0, r1) in zip(single, zip(*ranks, strict=True), strict=True):
        for key in ("mean", "std", "weight", "bias"):  # every rank took the same steps
            assert torch.equal(r0["model"][key], r1["model"][key]), key
        assert r0["world_size"] == 2 and one["world_size"] == 1
        for key in ("weight_decay", "C", "val_top1", "top1", "top5", "n_train", "n_val", "n_test"):
            assert r0[key] == one[key], key
        assert [p["weight_decay"] for p in r0["val_curve"]] == [p["weight_decay"] for p in one["val_curve"]]
        for a, b in zip(r0["val_curve"], one["val_curve"], strict=True):  # hold-out fits stop at path_tol = 1e-3
            assert a["val_top1"] == b["val_top1"] and abs(a["val_loss"] - b["val_loss"]) <= 1e-3 * b["val_loss"], a
        torch.testing.assert_close(r0["model"]["mean"], one["model"]["mean"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r0["model"]["std"], one["model"]["std"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r0["model"]["weight"], one["model"]["weight"], rtol=0, atol=1e-5)
        torch.testing.assert_close(r0["model"]["bias"], one["model"]["bias"], rtol=0, atol=1e-5)


def test_shard_blocks_cover_the_rows_and_bad_shards_are_refused():
    from selfsup.eval.shard import Shard

    def noop(t):
        return None

    for n, world in ((10, 3), (2, 3), (400, 2)):
        blocks = [Shard(r, world, noop).bounds(n) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks[:-1], blocks[1:], strict=True))  # contiguous
        assert all(hi - lo in (n // world, -(-n // world)) for lo, hi in blocks)  # balanced
    for bad in (dict(rank=2, world=2, all_reduce=noop), dict(rank=0, world=2)):
        with pytest.raises(ConfigError):
            Shard(**bad)
    tx, ty, vx, vy = blobs(40, 20, 4, 2, 1.0)
    with pytest.raises(ConfigError, match="one process"):
        linear_probe(tx, ty, vx, vy, batch_size=8, shard=Shard(0, 2, noop))


def test_l2_search_shows_each_strength_and_is_silent_without_progress(monkeypatch, capsys):
    import io

    from rich.console import Console
    from rich.progress import Progress

    from selfsup.eval import linear
    from selfsup.progress import COLUMNS

    seen = []

    class Recording(Progress):
        def update(self, task_id, **kw):
            if "description" in kw:
                seen.append(kw["description"])
            super().update(task_id, **kw)

    def recording(enabled=True, **kw):
        return Recording(*COLUMNS, console=Console(file=io.StringIO()), disable=not enabled)

    xtr, ytr, xte, yte = blobs(120, 60, 6, 3, sep=1.0)
    grid = [1e-3, 1e-2, 1e-1]
    quiet = linear_probe(xtr, ytr, xte, yte, weight_decays=grid, patience=None)  # progress is off by default
    assert capsys.readouterr() == ("", "")
    shown = linear_probe(xtr, ytr, xte, yte, weight_decays=grid, patience=None, progress=True)
    out = capsys.readouterr().out
    assert f"probe L2 search: chose weight_decay {shown['weight_decay']:g} (val top-1 " in out
    assert "3/3" in out  # how many strengths were fitted, of how many
    assert shown["top1"] == quiet["top1"]
    linear_probe(xtr, ytr, xte, yte, weight_decays=grid, patience=None, progress="pixels")
    assert "probe pixels L2 search: chose weight_decay" in capsys.readouterr().out  # names what it probes
    monkeypatch.setattr(linear, "make_progress", recording)
    linear_probe(xtr, ytr, xte, yte, weight_decays=grid, patience=None, progress=True)
    n_fit = shown["n_train"] - shown["n_val"]
    assert seen[:3] == [f"probe L2 search: weight_decay {wd:g} (C={1 / (wd * n_fit):.3g})"
                        for wd in [1e-1, 1e-2, 1e-3]]  # strongest first, with the equivalent C


def test_an_early_stopped_l2_search_says_so_and_fills_its_bar(capsys):
    xtr, ytr, xte, yte = blobs(120, 60, 6, 3, sep=1.0)
    grid = [10.0 ** -e for e in range(8)]
    res = linear_probe(xtr, ytr, xte, yte, weight_decays=grid, patience=1, progress=True)
    out = capsys.readouterr().out
    n = len(res["val_curve"])
    assert n < len(grid)  # these blobs stop the search early (seeded data)
    assert f", stopped at {n} of {len(grid)})" in out
    last = out.strip().splitlines()[-1]  # off a terminal, interval lines before it count against the grid
    assert f"{n}/{n}" in last and f"/{len(grid)}" not in last  # a full bar, not one cut off at n/8


def test_cpu_resident_budget_is_fixed_and_large_sets_stream():
    """On the CPU a training set is held resident (standardised once) only when twice its float32 copy
    fits 256 MiB, whatever memory the machine has: a larger set streams, so no second copy of large
    features is ever made."""
    from selfsup.eval import linear as lin

    cpu = torch.device("cpu")
    assert lin._resident_budget(cpu, None) == lin.CPU_RESIDENT_BYTES == 2**28
    assert lin._resident_budget(cpu, 123) == 123  # an explicit budget wins
    # 2 * 9000 * 4000 * 4 bytes = 275 MiB: past the budget (and no copy is made to find out)
    x = torch.zeros(9000, 4000)
    y = torch.zeros(9000, dtype=torch.long)
    stats = (torch.zeros(4000), torch.ones(4000))
    streamed = lin._prepare_rows(x, y, None, stats, cpu, 10, None)
    assert streamed.stats is not None and streamed.x is x  # read chunk by chunk from where it lives
    small = lin._prepare_rows(x[:100], y[:100], None, stats, cpu, 10, None)
    assert small.stats is None and small.x is not x  # one standardised copy
    assert lin._prepare_rows(x, y, None, stats, cpu, 10, 2**30).stats is None  # a larger explicit budget


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("subset", [False, True])
def test_streamed_blocks_equal_the_standardised_rows_and_leave_the_map_untouched(tmp_path, dtype, subset):
    """Streamed blocks are standardised into one reused buffer: each block, while current, holds exactly
    the standardised rows (as the resident copy does), in order, and the read-only memory map it is
    read from is never written."""
    from selfsup.eval import linear as lin

    rng = np.random.default_rng(0)
    path = tmp_path / "f.npy"
    np.save(path, (rng.standard_normal((1000, 24)) * 3 + 5).astype(dtype))
    mm = np.load(path, mmap_mode="r")
    x = torch.from_numpy(mm) if dtype == np.float32 else torch.from_numpy(np.asarray(mm))
    before = x.clone()
    rows = torch.from_numpy(np.sort(rng.choice(1000, 300, replace=False))) if subset else None
    y = torch.arange(1000 if rows is None else 300) % 7
    cpu = torch.device("cpu")
    stats = lin._mean_std(x, cpu, rows)
    data = lin._Rows(x, y, rows, stats, cpu, chunk=64)
    got, labels = [], []
    for xb, yb in data.blocks():
        got.append(xb.clone())
        labels.append(yb)
    ref = x.float() if rows is None else x[rows].float()
    ref = (ref - stats[0]) / stats[1]
    assert torch.equal(torch.cat(got), ref)  # bit for bit: same arithmetic as the resident copy
    assert torch.equal(torch.cat(labels), y)
    resident = lin._prepare_rows(x, y, rows, stats, cpu, 7, 2**30)
    assert resident.stats is None and torch.equal(resident.x, ref)
    assert torch.equal(x, before) and np.array_equal(np.load(path), before.numpy())
