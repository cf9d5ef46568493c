"""WebDataset shards: ``selfsup shard`` writes them, ``--data wds:DIR`` reads them like the folder they came from."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import SelfSupDataModule
from selfsup.data.datasets import has_split, load_dataset
from selfsup.data.geometry import TrainCrop
from selfsup.data.sampler import SampleIndex
from selfsup.data.shard_writer import PLAN_NAME, parse_shard_size, write_shards
from selfsup.data.shards import META_NAME, ShardStream
from selfsup.data.stream import FolderStream
from selfsup.errors import ConfigError, DataError
from selfsup.eval.features import TRANSFORM_ID, extract_features, sample_keys
from tests.conftest import run_cli_here


def make_folder(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """Two classes of noise JPEGs (``size`` = width, height) in ImageNet layout, plus one PNG per class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / (f"{i}.png" if i == 0 else f"{i}.jpg"))
    return root


def jpeg(w: int = 12, h: int = 10, seed: int = 0) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A shard in the published layout: ``KEY.ext`` members, a sample's members consecutive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def foreign_shards(root: Path, n: int = 6, labels=None) -> Path:
    """Shards as the published ImageNet copies have them: no selfsup metadata, keys without paths."""
    labels = labels if labels is not None else [i % 3 for i in range(n)]
    train = [(f"n{i:04d}", {"jpg": jpeg(seed=i), "cls": str(labels[i]).encode()}) for i in range(n)]
    write_tar(root / "imagenet1k-train-0000.tar", train[: n // 2])
    write_tar(root / "imagenet1k-train-0001.tar", train[n // 2 :])
    write_tar(root / "imagenet1k-validation-00.tar",
              [(f"v{i}", {"jpg": jpeg(seed=100 + i), "cls": b"1", "json": b"{}"}) for i in range(2)])
    return root


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sharded")
    src = make_folder(base / "src")
    out = base / "out"
    write_shards(src, out, shard_size="3", progress=False)
    return src, out


# ---------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("size", [16, 100])  # 16: evaluated whole (as the folder's cache); 100: centre crops
@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_give_the_folders_views_labels_keys_and_order(sharded, split, size) -> None:
    src, out = sharded
    shards = load_dataset(f"wds:{out}", split, image_size=size)
    folder = load_dataset(str(src), split, image_size=size)
    assert isinstance(shards, ShardStream) and len(shards) == len(folder) == (8 if split == "train" else 4)
    assert shards.classes == folder.classes == ["a", "b"]
    assert sample_keys(shards) == sample_keys(folder)  # e.g. "train/a/0.png": subsets by key agree
    assert shards.transform == getattr(folder, "transform", TRANSFORM_ID)
    for i in range(len(folder)):
        (x, y), (x2, y2) = shards[i], folder[i]
        assert y == y2 and torch.equal(x, x2), i


def test_features_from_shards_equal_the_folders(sharded, tmp_path) -> None:
    from selfsup.ssl.backbone import Backbone
    from selfsup.ssl.module import ImageEncoder

    src, out = sharded
    torch.manual_seed(0)
    encoder = ImageEncoder(Backbone("convnet_small")).eval()
    a = extract_features(encoder, f"wds:{out}", "val", image_size=100, cache_dir=tmp_path, progress=False)
    b = extract_features(encoder, str(src), "val", image_size=100, cache_dir=tmp_path, progress=False)
    assert a.path != b.path  # cached apart: the data's kind is part of the key
    assert np.array_equal(a.y, b.y) and np.array_equal(a.x, b.x)


def test_training_crops_device_decode_and_workers_agree(sharded) -> None:
    """Loader decode with 0 or 2 workers and device decode on the CPU cut the same crops of the same samples."""
    _, out = sharded
    seen = {}
    for mode, workers in (("loader", 0), ("loader", 2), ("device", 1)):
        dm = SelfSupDataModule(f"wds:{out}", batch_size=4, image_size=24, num_workers=workers, decode=mode, seed=3)
        dm.setup()
        module = SimpleNamespace(train_crop=lambda size: TrainCrop(size, (0.2, 1.0)))
        dm.trainer = SimpleNamespace(world_size=1, global_rank=0, num_devices=1, lightning_module=module,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
        batches = [dm.on_before_batch_transfer(b, 0) for b in dm.dataloader("train", shuffle=True, drop_last=True)]
        seen[(mode, workers)] = batches
        assert sum(len(b[1]) for b in batches) == 8
    ref = seen[("loader", 0)]
    for key, batches in seen.items():
        for (x, y), (x2, y2) in zip(ref, batches, strict=True):
            assert torch.equal(y, y2) and torch.equal(x, x2), key


def test_ranks_split_by_sample_read_none_twice_and_resume_mid_epoch(tmp_path) -> None:
    """11 samples in shards of 4, 4, 3 over 2 ranks: 5 each, disjoint, the one left out changes each epoch;
    a loader restored at batch 1 yields the rest of the epoch exactly."""
    root = foreign_shards(tmp_path / "wds", n=11)
    dm = SelfSupDataModule(f"wds:{root}", batch_size=2, image_size=8, num_workers=0, seed=1)
    dm.setup()
    left_out = set()
    for epoch in range(4):
        per_rank = []
        for rank in range(2):
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, num_devices=1, lightning_module=None)
            loader = dm.dataloader("train", shuffle=True)
            loader.sampler.set_epoch(epoch)
            per_rank.append([int(i) for i in loader.sampler])
        a, b = per_rank
        assert len(a) == len(b) == 5 and not set(a) & set(b)
        left_out |= set(range(11)) - set(a) - set(b)
        if epoch == 0:
            full = [int(i) for i in loader.sampler]
            loader.load_state_dict({"epoch": 0, "batches": 1, "batch_size": 2})
            assert [int(i) for i in loader.sampler] == full[2:]
            assert [int(i) for i in loader.sampler] == full  # skipping happens once
            # The position sets the epoch too: Lightning's workers start reading before it sets the epoch.
            loader.load_state_dict({"epoch": 3, "batches": 1, "batch_size": 2})
            assert loader.sampler.epoch == 3
            loader.load_state_dict({"epoch": 3, "batches": len(loader), "batch_size": 2})  # a finished epoch
            assert loader.sampler.epoch == 4
    assert len(left_out) > 1  # not always the same sample


def test_foreign_shards_classes_from_labels_keys_and_has_split(tmp_path) -> None:
    root = foreign_shards(tmp_path / "wds")
    train = load_dataset(f"wds:{root}", "train", image_size=8)
    assert train.classes == ["0", "1", "2"] and list(train.labels) == [0, 1, 2, 0, 1, 2]
    assert sample_keys(train) == [f"n{i:04d}" for i in range(6)]
    assert has_split(f"wds:{root}", "val") and len(load_dataset(f"wds:{root}", "val", image_size=8)) == 2
    (root / "imagenet1k-validation-00.tar").unlink()
    assert not has_split(f"wds:{root}", "val")


def test_index_is_cached_and_rebuilt_when_a_shard_changes(tmp_path) -> None:
    root = foreign_shards(tmp_path / "wds")
    cache = tmp_path / "cache"
    assert len(load_dataset(f"wds:{root}", "train", image_size=8, cache_dir=cache)) == 6
    assert len(list((cache / "shard-index").glob("*.npz"))) == 1  # the train split's
    assert len(load_dataset(f"wds:{root}", "val", image_size=8, cache_dir=cache)) == 2
    assert len(list((cache / "shard-index").glob("*.npz"))) == 2  # and the val split's
    write_tar(root / "imagenet1k-train-0001.tar", [("x", {"jpg": jpeg(), "cls": b"0"})])
    assert len(load_dataset(f"wds:{root}", "train", image_size=8, cache_dir=cache)) == 4


# ---------------------------------------------------------------------------------------------- writing


def test_writer_metadata_and_webdataset_reads_the_shards(sharded) -> None:
    src, out = sharded
    meta = json.loads((out / META_NAME).read_text())
    assert meta["classes"] == ["a", "b"] and meta["max_resolution"] is None
    assert meta["splits"]["train"] == {"samples": 8, "shards": ["train-000000.tar", "train-000001.tar",
                                                                "train-000002.tar"], "skipped": 0}
    assert meta["splits"]["val"]["samples"] == 4 and len(meta["source_fingerprint"]) == 64
    import webdataset as wds

    samples = list(wds.WebDataset([str(out / n) for n in meta["splits"]["train"]["shards"]], shardshuffle=False))
    assert len(samples) == 8
    paths = {json.loads(s["json"])["path"] for s in samples}
    assert paths == set(sample_keys(load_dataset(str(src), "train", image_size=16)))
    for s in samples:  # image bytes unchanged, label the class index
        info = json.loads(s["json"])
        ext = next(k for k in s if k in ("jpg", "png"))
        assert s[ext] == (src / info["path"]).read_bytes()
        assert int(s["cls"]) == ["a", "b"].index(info["class"])


def test_max_resolution_reencodes_only_larger_images(tmp_path) -> None:
    src = make_folder(tmp_path / "src", n_train=2, n_val=1, size=(60, 45))
    (src / "train" / "a" / "small.jpg").write_bytes(jpeg(20, 15))
    out = tmp_path / "out"
    meta = write_shards(src, out, max_resolution=32, progress=False)
    assert meta["max_resolution"] == 32
    ds = load_dataset(f"wds:{out}", "train", image_size=16)
    for i in range(len(ds)):
        with Image.open(io.BytesIO(ds.read_bytes(i))) as im:
            if ds.files[i].endswith("small.jpg"):
                assert ds.read_bytes(i) == (src / ds.files[i]).read_bytes()
            else:
                assert im.size == (32, 24)


def test_writer_resumes_redoes_a_partial_shard_and_refuses_other_sources(tmp_path) -> None:
    src = make_folder(tmp_path / "src")
    out = tmp_path / "out"
    write_shards(src, out, shard_size="3", progress=False)
    first = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    (out / "train-000001.tar").unlink()
    (out / META_NAME).unlink()
    (out / "train-000001.tar.tmp-999999999").write_bytes(b"half a shard")  # a crashed writer's leftover
    write_shards(src, out, shard_size="3", progress=False, workers=2)  # a pool: the same bytes
    assert not list(out.glob("*.tmp-*"))
    for p in out.glob("*.tar"):
        data, mtime = first[p.name]
        assert p.read_bytes() == data  # the redone shard is byte-identical
        assert (p.stat().st_mtime_ns == mtime) == (p.name != "train-000001.tar")  # the others were kept
    assert (out / META_NAME).is_file()
    with pytest.raises(DataError, match="other options"):
        write_shards(src, out, shard_size="2", progress=False)
    foreign = foreign_shards(tmp_path / "foreign")
    with pytest.raises(DataError, match="did not write"):
        write_shards(src, foreign, progress=False)


def test_shard_size_in_samples_or_bytes() -> None:
    assert parse_shard_size("1000") == (1000, None)
    assert parse_shard_size("500MB") == (None, 500_000_000)
    assert parse_shard_size("1GiB") == (None, 1024**3)
    for bad in ("0", "-3", "1.5", "lots"):
        with pytest.raises(ConfigError, match="--shard-size"):
            parse_shard_size(bad)


def test_cli_shard_then_knn_reads_wds(tmp_path) -> None:
    src = make_folder(tmp_path / "src")
    r = run_cli_here("shard", str(src), str(tmp_path / "out"), "--shard-size", "5KB", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train 8 samples in" in r.stdout and f"wds:{tmp_path / 'out'}" in r.stdout
    assert (tmp_path / "out" / PLAN_NAME).is_file()
    assert len(list((tmp_path / "out").glob("train-*.tar"))) > 1  # 5 KB shards of ~1.5 KB images
    r = run_cli_here("shard", str(src), str(tmp_path / "out2"), "--shard-size", "big", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--shard-size" in r.stderr


# ---------------------------------------------------------------------------------------------- bad input


def _one_line(tmp_path: Path, root: Path, *extra: str) -> str:
    """The CLI's answer to pretraining on ``wds:root``: one error line, no traceback."""
    r = run_cli_here("pretrain", "--data", f"wds:{root}", "--backbone", "convnet_small", "--max-steps", "1",
                     "--output", str(tmp_path / "runs"), *extra, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("selfsup: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_truncated_shard_is_one_line_naming_it(tmp_path) -> None:
    root = foreign_shards(tmp_path / "wds")
    shard = root / "imagenet1k-train-0001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: 512 + 300])  # inside the first member's image
    line = _one_line(tmp_path, root)
    assert "truncated" in line and str(shard) in line
    shard.write_bytes(data[: 1024 + 200])  # inside the second member's header
    with pytest.raises(DataError, match="truncated"):
        load_dataset(f"wds:{root}", image_size=8)


def test_not_a_tar_and_compressed_shards(tmp_path) -> None:
    root = foreign_shards(tmp_path / "wds")
    (root / "imagenet1k-train-0001.tar").write_bytes(b"<html>not found</html>" * 50)
    with pytest.raises(DataError, match="is not a tar file"):
        load_dataset(f"wds:{root}", image_size=8)
    packed = tmp_path / "gz"
    packed.mkdir()
    (packed / "train-0.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="compressed shard.*decompress"):
        load_dataset(f"wds:{packed}", image_size=8)


def test_labels_missing_not_integer_or_out_of_range(tmp_path) -> None:
    base = foreign_shards(tmp_path / "a")
    write_tar(base / "imagenet1k-train-0001.tar", [("k9", {"jpg": jpeg()})])
    with pytest.raises(DataError, match=r"'k9' in shard .*0001.tar has no label \(.cls\)"):
        load_dataset(f"wds:{base}", image_size=8)
    write_tar(base / "imagenet1k-train-0001.tar", [("k9", {"jpg": jpeg(), "cls": b"cat"})])
    with pytest.raises(DataError, match="not an integer"):
        load_dataset(f"wds:{base}", image_size=8)
    write_tar(base / "imagenet1k-train-0001.tar", [("k9", {"jpg": jpeg(), "cls": b"-1"})])
    with pytest.raises(DataError, match="label -1, outside"):
        load_dataset(f"wds:{base}", image_size=8)
    # A validation label beyond the train labels' range; and a label beyond selfsup_shards.json's classes.
    write_tar(base / "imagenet1k-train-0001.tar", [("k9", {"jpg": jpeg(), "cls": b"1"})])
    write_tar(base / "imagenet1k-validation-00.tar", [("v0", {"jpg": jpeg(), "cls": b"7"})])
    assert len(load_dataset(f"wds:{base}", "train", image_size=8)) == 4
    with pytest.raises(DataError, match="'v0' .* label 7, outside the 3 classes"):
        load_dataset(f"wds:{base}", "val", image_size=8)
    (base / META_NAME).write_text(json.dumps({"classes": ["x", "y"]}))
    with pytest.raises(DataError, match=f"label 2, outside the 2 classes of {META_NAME}"):
        load_dataset(f"wds:{base}", "train", image_size=8)


def test_undecodable_image_stops_naming_shard_and_key_or_is_skipped(tmp_path) -> None:
    root = foreign_shards(tmp_path / "wds")
    write_tar(root / "imagenet1k-train-0001.tar", [("broken", {"jpg": jpeg()[:40], "cls": b"0"})])
    ds = load_dataset(f"wds:{root}", image_size=8)
    i = ds.files.index("broken")
    with pytest.raises(DataError, match=r"sample 'broken' of shard .*0001.tar is corrupt or truncated"):
        ds[SampleIndex(i, 0)]
    line = _one_line(tmp_path, root, "--num-workers", "0", "--batch-size", "4")
    assert "'broken'" in line and "--skip-bad-images" in line
    skipping = load_dataset(f"wds:{root}", image_size=8, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping bad image.*'broken'"):
        x, y = skipping[SampleIndex(i, 0)]
    assert x.shape == (3, 8, 8)
    # A sample with no image at all: stops, or is left out with --skip-bad-images.
    write_tar(root / "imagenet1k-train-0001.tar", [("bare", {"cls": b"0"})])
    with pytest.raises(DataError, match="'bare' .* has no image"):
        load_dataset(f"wds:{root}", image_size=8)
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        assert len(load_dataset(f"wds:{root}", image_size=8, skip_bad=True)) == 3


def test_no_train_shards_and_missing_shard(tmp_path, sharded) -> None:
    root = tmp_path / "wds"
    write_tar(root / "shard-0000.tar", [("k", {"jpg": jpeg(), "cls": b"0"})])
    line = _one_line(tmp_path, root)
    assert "no shards with 'train' in their names" in line and "shard-0000.tar" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no .tar files"):
        load_dataset(f"wds:{empty}")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"wds:{tmp_path / 'nowhere'}")
    _, out = sharded  # a shard gone from a folder selfsup shard wrote: its metadata's counts disagree
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        if p.name != "train-000001.tar":
            (copy / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match="hold 5 samples but selfsup_shards.json says 8"):
        load_dataset(f"wds:{copy}", image_size=16)


def test_fd_cache_survives_many_shards(tmp_path, monkeypatch) -> None:
    """More shards than the open-file limit: descriptors are recycled, every sample still reads right."""
    import selfsup.data.shards as shards

    monkeypatch.setattr(shards, "_OPEN_LIMIT", 2)
    root = tmp_path / "wds"
    for s in range(5):
        write_tar(root / f"train-{s}.tar", [(f"s{s}", {"jpg": jpeg(seed=s), "cls": b"0"})])
    ds = load_dataset(f"wds:{root}", image_size=8)
    assert all(ds.read_bytes(i) == jpeg(seed=i) for i in (0, 1, 2, 3, 4, 0, 4))
    assert len(shards._open) <= 2
    assert not isinstance(ds, FolderStream) or isinstance(ds, ShardStream)


def test_unpicklable_state_is_not_carried_to_spawned_workers(sharded) -> None:
    import pickle

    _, out = sharded
    ds = load_dataset(f"wds:{out}", image_size=16)
    ds.read_bytes(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0][0], ds[0][0]) and os.getpid() > 0


def test_subset_files_name_shard_samples_by_key(sharded, tmp_path) -> None:
    from selfsup.eval.label_efficiency import subset_from_file

    src, out = sharded
    listing = tmp_path / "subset.txt"
    listing.write_text("a/1.jpg\ntrain/b/2.jpg\n")
    shards, folder = load_dataset(f"wds:{out}", image_size=16), load_dataset(str(src), image_size=16)
    chosen = subset_from_file(listing, sample_keys(shards))
    assert len(chosen) == 2 and np.array_equal(chosen, subset_from_file(listing, sample_keys(folder)))
    root = foreign_shards(tmp_path / "wds")
    listing.write_text("n0004\n")
    assert list(subset_from_file(listing, sample_keys(load_dataset(f"wds:{root}", image_size=8)))) == [4]


def digits_shards(base: Path, n_train: int = 160, n_val: int = 40) -> Path:
    """The embedded digits at 16 px as PNGs in a folder, written as shards of 50 samples."""
    for split, n in (("train", n_train), ("val", n_val)):
        ds = load_dataset("digits", split, image_size=16)
        for i in range(n):
            x, y = ds[i]
            d = base / "src" / split / str(y)
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    write_shards(base / "src", base / "wds", shard_size="50", progress=False)
    return base / "wds"


@pytest.mark.slow
def test_pretraining_on_shards_killed_mid_epoch_resumes_to_the_same_losses(tmp_path) -> None:
    """As tests/test_resume.py for folders: 160 samples, batches of 32 (5 steps an epoch), killed at step 7
    (one after the step-6 checkpoint, so the resume starts at batch 1 of epoch 1); every loss bit-identical."""
    import subprocess
    import sys

    from selfsup.train import pretrain
    from tests.test_resume import KILLED_RUN, SAME_THREADS, _losses

    root = digits_shards(tmp_path)
    config = {"method": "rotation", "checkpoint_every": 2, "model": {"backbone": "convnet_small"},
              "data": {"data": f"wds:{root}", "image_size": 16, "batch_size": 32, "num_workers": 1},
              "trainer": {"max_epochs": 2, "log_every_n_steps": 1}, "output": str(tmp_path)}
    full = pretrain({**config, "name": "full"})
    cfg = {**config, "name": "cut"}
    r = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(cfg)], capture_output=True, text=True,
                       env=SAME_THREADS, timeout=600)
    assert r.returncode == -9, r.stderr[-3000:]
    resumed = pretrain(cfg, resume=True)
    expected = _losses(full.run_dir)
    assert len(expected) == 10
    assert _losses(tmp_path / "cut") == expected
    assert resumed.metrics["val/online_top1"] == full.metrics["val/online_top1"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_pretrain_on_shards_then_resume_as_one_process(tmp_path, monkeypatch) -> None:
    """Two ``torchrun`` agents on loopback (2 nodes x 1 process, gloo, CPU) pretrain one run on shards for 2
    steps, then resume it to 4; the weights equal one process's doing the same on the same global batch,
    within the tolerance DDP meets (as tests/test_ddp_pretrain.py: rotation, no augmentation, group norm,
    so the two nodes' halves of each batch are exactly the one process's batch). A run stopped by
    --max-steps has finished its epoch in Lightning's count, so the resume trains the next epoch's first
    batches; the mid-epoch resume is the kill test above."""
    import csv
    import subprocess
    import sys

    from selfsup.ssl.module import load_encoder
    from tests.conftest import ROOT, run_cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = digits_shards(tmp_path)
    common = ("pretrain", "--method", "rotation", "--backbone", "convnet_small", "--norm", "group", "--data",
              f"wds:{root}", "--image-size", "16", "--crop-scale", "1.0", "--no-flip", "--no-online-probe",
              "--seed", "0", "--lr", "0.5", "--warmup-epochs", "0", "--max-epochs", "2", "--num-workers", "0",
              "--log-every-n-steps", "1", "--output", str(tmp_path))

    def one_process(*extra: str) -> None:
        r = run_cli(*common, "--batch-size", "16", "--name", "one", *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]

    def two_nodes(*extra: str) -> None:
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        assert "SELFSUP_RUN_DIR" not in env  # an earlier in-process pretrain must not leak its run dir to them
        agents = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "selfsup-test",
             "-m", "selfsup", *common, "--batch-size", "8", "--accelerator", "cpu", "--devices", "1",
             "--num-nodes", "2", "--strategy", "ddp", "--name", "two", *extra],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [a.communicate(timeout=600)[0] for a in agents]
        for a, out in zip(agents, outs, strict=True):
            assert a.returncode == 0, out[-3000:]

    for run in (one_process, two_nodes):
        run("--max-steps", "2")
        run("--max-steps", "4", "--resume")
    one, two = (load_encoder(tmp_path / n / "export").state_dict() for n in ("one", "two"))
    assert one.keys() == two.keys() and one
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    for name in ("one", "two"):
        with (tmp_path / name / "metrics.csv").open(newline="") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
        assert steps == [0, 1, 2, 3], name  # each of the 4 steps trained once


def test_shard_a_folder_with_a_bad_image_stops_or_skips_it(tmp_path) -> None:
    src = make_folder(tmp_path / "src")
    bad = src / "train" / "b" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    r = run_cli_here("shard", str(src), str(tmp_path / "out2"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(bad) in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "out2").glob("*.tar*"))  # the shard being written was removed, not left half-done
    # The command again, as the error says, into the same folder (it holds no shard yet, so new options are fine).
    r = run_cli_here("shard", str(src), str(tmp_path / "out2"), "--skip-bad-images", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train 7 samples" in r.stdout and "skipped 1 bad image" in r.stdout
    meta = json.loads((tmp_path / "out2" / META_NAME).read_text())
    assert meta["skipped_images"] == ["train/b/2.jpg"]
    assert len(load_dataset(f"wds:{tmp_path / 'out2'}", image_size=16)) == 7  # the counts agree with the shards
    with pytest.raises(ConfigError, match="--max-resolution"):
        write_shards(src, tmp_path / "out3", max_resolution=0, progress=False)
