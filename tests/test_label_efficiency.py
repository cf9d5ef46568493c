import json

import numpy as np
import pytest
import torch

from selfsup.errors import ConfigError
from selfsup.eval.label_efficiency import SCHEMA, label_efficiency_sweep, subset_from_file, subset_indices


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(5), [30, 25, 40, 12, 50]))


def test_k_per_class_is_stratified_sorted_and_deterministic(labels):
    idx = subset_indices(labels, k=10, seed=0, dataset_key="toy")
    assert np.bincount(labels[idx]).tolist() == [10] * 5
    assert np.all(np.diff(idx) > 0) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, subset_indices(labels, k=10, seed=0, dataset_key="toy"))
    np.testing.assert_array_equal(
        idx, subset_indices(torch.from_numpy(labels), k=10, seed=0, dataset_key="toy")
    )


def test_k_larger_than_a_class_takes_the_whole_class(labels):
    idx = subset_indices(labels, k=20)
    assert np.bincount(labels[idx]).tolist() == [20, 20, 20, 12, 20]


def test_subsets_are_nested_across_budgets(labels):
    s2, s5, s10 = (set(subset_indices(labels, k=k, seed=3, dataset_key="toy")) for k in (2, 5, 10))
    assert s2 < s5 < s10
    p1, p10, p50 = (set(subset_indices(labels, percent=p, seed=3, dataset_key="toy")) for p in (1, 10, 50))
    assert p1 < p10 < p50


def test_seed_and_dataset_key_change_the_subset(labels):
    base = subset_indices(labels, k=5, seed=0, dataset_key="toy")
    assert not np.array_equal(base, subset_indices(labels, k=5, seed=1, dataset_key="toy"))
    assert not np.array_equal(base, subset_indices(labels, k=5, seed=0, dataset_key="other"))


def test_a_class_subset_depends_only_on_its_own_indices(labels):
    relabelled = labels.copy()
    relabelled[labels == 4] = 7  # change another class's label value
    a = subset_indices(labels, k=5, seed=2)
    b = subset_indices(relabelled, k=5, seed=2)
    np.testing.assert_array_equal(a[labels[a] != 4], b[relabelled[b] != 7])


def test_percent_subsets_round_up_with_at_least_one_per_class(labels):
    idx = subset_indices(labels, percent=1)
    assert np.bincount(labels[idx]).tolist() == [1] * 5
    idx = subset_indices(labels, percent=10)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 4, 2, 5]  # ceil(10% of 30, 25, 40, 12, 50)
    assert len(subset_indices(labels)) == len(labels)


def test_subset_errors(labels):
    with pytest.raises(ConfigError, match="not both"):
        subset_indices(labels, k=1, percent=1)
    with pytest.raises(ConfigError, match="positive integer"):
        subset_indices(labels, k=0)
    with pytest.raises(ConfigError, match="percent"):
        subset_indices(labels, percent=150)
    with pytest.raises(ConfigError, match="integer class labels"):
        subset_indices(labels.astype(float), k=1)


def blob_features(seed, d=8, noise=1.0):
    rng = np.random.default_rng(0)
    ty, vy = np.repeat(np.arange(4), 15), np.repeat(np.arange(4), 10)
    centres = np.random.default_rng(seed).normal(size=(4, d)) * 2
    tx = (centres[ty] + noise * rng.normal(size=(60, d))).astype(np.float32)
    vx = (centres[vy] + noise * rng.normal(size=(40, d))).astype(np.float32)
    return tx, ty, vx, vy


def test_sweep_structure_and_json(capsys):
    calls = []

    def finetune(name, idx, seed):
        calls.append((name, len(idx), seed))
        return {"top1": 50.0 + seed, "top5": 100.0}

    encoders = {"learned": blob_features(1), "random_init": blob_features(2, noise=5.0)}
    encoders["learned"] = tuple(torch.from_numpy(a) for a in encoders["learned"])
    res = label_efficiency_sweep(
        encoders, ks=(1, 5, 100, None), percents=(10,), seeds=(0, 1), dataset_key="toy", progress=False,
        finetune_fn=finetune,
    )  # fmt: skip
    json.loads(json.dumps(res, allow_nan=False))
    assert res["schema"] == SCHEMA and res["dataset"] == "toy" and res["seeds"] == [0, 1]
    assert res["methods"] == ["linear", "knn", "finetune"]
    assert (res["num_classes"], res["n_train"], res["n_test"]) == (4, 60, 40)
    names = [b["name"] for b in res["budgets"]]
    assert names == ["k=1", "k=5", "10%", "all"]  # k=100 > largest class (15) is dropped
    assert [b["n_labels"] for b in res["budgets"]] == [4, 20, 8, 60]
    assert res["budgets"][-1] == {
        "name": "all",
        "k": None,
        "percent": 100.0,
        "n_labels": 60,
        "labels_per_class": 15.0,
    }
    for enc in encoders:
        for method in res["methods"]:
            entries = res["results"][enc][method]
            assert [e["budget"] for e in entries] == names
            for e in entries:
                assert len(e["runs"]) == 2 and [r["seed"] for r in e["runs"]] == [0, 1]
                assert 0 <= e["top1_mean"] <= e["top5_mean"] <= 100 and e["top1_std"] >= 0
                assert e["top1_mean"] == pytest.approx(np.mean([r["top1"] for r in e["runs"]]))
    knn_all = res["results"]["learned"]["knn"][-1]
    assert knn_all["runs"][0]["top1"] == knn_all["runs"][1]["top1"] and knn_all["top1_std"] == 0.0
    # k=1 per class: 1-NN (never more neighbours than the smallest class has labels)
    assert res["results"]["learned"]["knn"][0]["runs"][0]["k_neighbours"] == 1
    assert "weight_decay" in res["results"]["learned"]["linear"][0]["runs"][0]
    assert res["results"]["learned"]["finetune"][0]["top1_std"] == pytest.approx(np.std([50, 51], ddof=1))
    assert sorted(calls)[0] == ("learned", 4, 0) and len(calls) == 2 * 4 * 2
    assert res["results"]["learned"]["linear"][-1]["top1_mean"] > 90
    assert capsys.readouterr().out == ""  # progress=False prints nothing


def test_sweep_errors():
    a, b = blob_features(1), blob_features(2)
    with pytest.raises(ConfigError, match="different labels"):
        label_efficiency_sweep({"a": a, "b": (b[0], b[1][::-1].copy(), b[2], b[3])}, progress=False)
    with pytest.raises(ConfigError, match="finetune_fn"):
        label_efficiency_sweep({"a": a}, methods=("finetune",), progress=False)
    with pytest.raises(ConfigError, match="methods"):
        label_efficiency_sweep({"a": a}, methods=("svm",), progress=False)
    nan = a[0].copy()
    nan[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        label_efficiency_sweep({"a": (nan, *a[1:])}, progress=False)
    with pytest.raises(ConfigError, match="no label budget"):
        label_efficiency_sweep({"a": a}, ks=(1000,), progress=False)


def test_subsets_keyed_by_paths_ignore_row_order_location_and_dataset_key():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    paths = [f"train/c{y}/img_{i:04d}.JPEG" for i, y in enumerate(labels)]
    perm = rng.permutation(200)
    for k, percent in ((3, None), (None, 10.0)):
        a = subset_indices(labels, k=k, percent=percent, seed=1, dataset_key="/data/imagenet", keys=paths)
        b = subset_indices(labels[perm], k=k, percent=percent, seed=1, dataset_key="/mnt/imagenet",
                           keys=[paths[i] for i in perm])
        assert {paths[i] for i in a} == {paths[perm[i]] for i in b}
    other_seed = subset_indices(labels, k=3, seed=2, keys=paths)
    assert set(other_seed) != set(subset_indices(labels, k=3, seed=1, keys=paths))
    nested = [set(subset_indices(labels, k=k, seed=0, keys=paths)) for k in (1, 3, 9)]
    assert nested[0] <= nested[1] <= nested[2]
    with pytest.raises(ConfigError, match="one key per label"):
        subset_indices(labels, k=1, keys=paths[:-1])


def test_subset_file_matches_file_names_and_relative_paths(tmp_path):
    paths = ["train/n01/n01_1.JPEG", "train/n01/n01_2.JPEG", "train/n02/n02_1.JPEG", "train/n02/n02_2.JPEG"]
    listing = tmp_path / "1percent.txt"
    listing.write_text("n01_2.JPEG\n\n# comment\nn02/n02_1.JPEG\n")
    np.testing.assert_array_equal(subset_from_file(listing, paths), [1, 2])
    (tmp_path / "bad.txt").write_text("n03_1.JPEG\n")
    with pytest.raises(ConfigError, match="1 of 1 entries match no image"):
        subset_from_file(tmp_path / "bad.txt", paths)
    with pytest.raises(ConfigError, match="several images"):
        subset_from_file(listing, [*paths, "val/n01/n01_2.JPEG"])
    tx, ty, vx, vy = blob_features(0)
    keys = [f"train/c{y}/{i}.png" for i, y in enumerate(ty)]
    chosen = np.concatenate([np.flatnonzero(ty == c)[:2] for c in range(4)])
    (tmp_path / "four.txt").write_text("\n".join(keys[i].rsplit("/", 1)[-1] for i in chosen))
    res = label_efficiency_sweep({"a": (tx, ty, vx, vy)}, ks=(2,), seeds=(0, 1), keys=keys,
                                 subset_files=[tmp_path / "four.txt"], progress=False)
    budget = res["budgets"][-1]
    assert budget["name"] == "file:four.txt" and budget["n_labels"] == 8 and len(budget["sha256"]) == 64
    assert res["results"]["a"]["knn"][-1]["runs"][0]["k_neighbours"] == 2


def test_sharded_sweep_equals_one_process():
    """Two ranks each run their share of the fits; gathered, the result equals the single-process sweep."""
    encoders = {"learned": blob_features(1)}
    common = dict(ks=(1, None), seeds=(0, 1), dataset_key="toy", progress=False)
    single = label_efficiency_sweep(encoders, **common)
    shares = {}

    class Stop(Exception):
        pass

    def gather_rank1(d):
        shares[1] = d
        raise Stop

    with pytest.raises(Stop):
        label_efficiency_sweep(encoders, shard=(1, 2), gather=gather_rank1, **common)
    sharded = label_efficiency_sweep(encoders, shard=(0, 2), gather=lambda d: {**d, **shares[1]}, **common)
    assert shares[1] and len(shares[1]) < 7  # rank 1 did part of the 7 distinct fits (4 linear, 3 kNN)

    def strip(res):
        return {name: {m: [[{k: v for k, v in r.items() if k != "seconds"} for r in e["runs"]] for e in entries]
                       for m, entries in by_method.items()} for name, by_method in res["results"].items()}

    assert strip(sharded) == strip(single)


def test_classes_with_fewer_than_k_images_are_recorded():
    from selfsup.eval.harness import classes_under_k_note, name_classes

    tx, ty, vx, vy = blob_features(1)
    keep = np.flatnonzero((ty != 2) | (np.arange(len(ty)) % 15 < 6))  # class 2 keeps 6 of its 15 images
    res = label_efficiency_sweep({"enc": (tx[keep], ty[keep], vx, vy)}, ks=(1, 5, 10, None), seeds=(0,),
                                 methods=("knn",), progress=False)
    by_name = {b["name"]: b for b in res["budgets"]}
    assert by_name["k=1"]["classes_under_k"] == [] and by_name["k=5"]["classes_under_k"] == []
    assert by_name["k=10"]["classes_under_k"] == [{"class": 2, "n": 6}]
    assert by_name["k=10"]["n_labels"] == 3 * 10 + 6
    assert res["classes_under_k"] == {"k=10": {"2": 6}}
    json.loads(json.dumps(res, allow_nan=False))
    name_classes(res, ["ant", "bee", "cat", "dog"])
    assert res["classes_under_k"] == {"k=10": {"cat": 6}} and by_name["k=10"]["classes_under_k"][0]["name"] == "cat"
    assert classes_under_k_note(res) == ("note: k=10: 1 class has fewer than 10 training images, so that budget "
                                         "uses all of them: cat (6)")
    full = label_efficiency_sweep({"enc": (tx, ty, vx, vy)}, ks=(5,), seeds=(0,), methods=("knn",), progress=False)
    assert full["classes_under_k"] == {} and classes_under_k_note(full) is None


def test_all_budget_is_the_probe_fit_for_every_seed():
    """'all' is `selfsup probe`'s fit: one hold-out split (the probe's), so every seed gives the probe's result."""
    from selfsup.eval.linear import linear_probe

    tx, ty, vx, vy = blob_features(3, noise=2.5)
    calls = []
    import selfsup.eval.label_efficiency as le

    real = le.linear_probe

    def counting(*a, **kw):
        calls.append(kw.get("train_rows") is None)
        return real(*a, **kw)

    le.linear_probe = counting
    try:
        res = label_efficiency_sweep({"learned": (tx, ty, vx, vy)}, ks=[None], seeds=[0, 1, 2], methods=["linear"],
                                     progress=False)
    finally:
        le.linear_probe = real
    assert calls == [True]  # one fit for three seeds
    entry = res["results"]["learned"]["linear"][-1]
    probe = linear_probe(tx, ty, vx, vy)
    assert [r["top1"] for r in entry["runs"]] == [probe["top1"]] * 3
    assert [r["weight_decay"] for r in entry["runs"]] == [probe["weight_decay"]] * 3
    assert entry["top1_std"] == 0.0


def test_a_subset_file_naming_an_image_twice_is_refused_not_counted_short(tmp_path):
    """A line repeated, or a bare name and a relative path of one image, made a budget of fewer images than the
    file has lines, silently (the indices were deduplicated); ``./`` before a path (``find .``) matches."""
    paths = ["train/n01/n01_1.JPEG", "train/n01/n01_2.JPEG", "train/n02/n02_1.JPEG"]
    listing = tmp_path / "list.txt"
    listing.write_text("n01_2.JPEG\nn02_1.JPEG\nn01_2.JPEG\n")
    with pytest.raises(ConfigError, match=r"'n01_2.JPEG' is listed twice \(3 lines, 2 images\); list each image"):
        subset_from_file(listing, paths)
    listing.write_text("n01_2.JPEG\nn01/n01_2.JPEG\n")
    with pytest.raises(ConfigError, match="'n01_2.JPEG' and 'n01/n01_2.JPEG' name the same image"):
        subset_from_file(listing, paths)
    listing.write_text("./n01/n01_2.JPEG\n./train/n02/n02_1.JPEG\n")
    np.testing.assert_array_equal(subset_from_file(listing, paths), [1, 2])
    with pytest.raises(ConfigError, match="is a folder; give a text file"):
        subset_from_file(tmp_path, paths)
