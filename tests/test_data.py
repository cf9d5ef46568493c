"""Tests of selfsup.data: datasets, the decode-once cache, bad input, image modes, DataModule, augment."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import (
    ArrayDataset,
    FolderStream,
    SelfSupDataModule,
    batch_collate,
    load_dataset,
    make_augment,
)
from selfsup.data import cache as cache_mod
from selfsup.data import datasets as ds_mod
from selfsup.errors import DataError

CLASSES = ("cat", "dog", "frog")


def _write(path: Path, image: Image.Image, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def _rgb(value: int, size: int = 12) -> Image.Image:
    return Image.new("RGB", (size, size), (value, 255 - value, 40))


def make_folder(root: Path, per_class: int = 3, size: int = 12, val: bool = True) -> Path:
    """ImageNet layout root/{train,val}/<class>/<i>.png with one colour per class."""
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            _write(root / "train" / name / f"{i}.png", _rgb(60 * c + i, size))
            if val and i < 2:
                _write(root / "val" / name / f"{i}.jpg", _rgb(60 * c + i, size))
    return root


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# -------------------------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_determinism() -> None:
    train, val = load_dataset("digits"), load_dataset("digits", "val")
    assert isinstance(train, ArrayDataset) and (len(train), len(val)) == (1437, 360)
    assert train.classes == [str(i) for i in range(10)] and train.image_size == 32 and train.name == "digits"
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and isinstance(label, int)
    assert train.labels.dtype == np.int64 and np.bincount(val.labels).min() >= 35  # stratified
    assert torch.equal(image[0], image[1]) and int(image.max()) > 200  # gray, scaled to 0..255
    again = load_dataset("digits", "val")
    assert np.array_equal(again.images, val.images) and np.array_equal(again.labels, val.labels)
    small = load_dataset("digits", image_size=16)
    assert small[0][0].shape == (3, 16, 16)


def test_getitems_batched_in_requested_order() -> None:
    ds = load_dataset("digits", "val")
    order = [7, 2, 300, 2, 0]
    images, labels = ds.__getitems__(order)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    for row, i in enumerate(order):
        assert torch.equal(images[row], ds[i][0]) and int(labels[row]) == ds[i][1]
    assert batch_collate((images, labels)) == (images, labels)
    collated = batch_collate([ds[0], ds[1]])
    assert collated[0].shape == (2, 3, 32, 32) and collated[1].dtype == torch.int64


# -------------------------------------------------------------------------------------------- folders


def test_folder_loads_and_caches(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "data")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    train = load_dataset(str(root), cache_dir=cache)
    assert isinstance(train, ArrayDataset) and isinstance(train.images, np.memmap)
    assert (
        train.classes == list(CLASSES) and train.image_size == 12 and train.name == f"folder:{root.resolve()}"
    )
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    image, label = train[4]
    assert image.shape == (3, 12, 12) and image.dtype == torch.uint8 and label == 1
    assert image[:, 0, 0].tolist() == [61, 194, 40]  # the colour written for dog/1.png
    assert len(list(cache.glob("*.images.npy"))) == 1

    val = load_dataset(f"folder:{root}", "val", cache_dir=cache)
    assert len(val) == 6 and val.labels.tolist() == [0, 0, 1, 1, 2, 2]

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    with monkeypatch.context() as m:  # second load hits the cache
        m.setattr(cache_mod, "_decode_files", no_decode)
        again = load_dataset(str(root), cache_dir=cache)
        assert np.array_equal(np.asarray(again.images), np.asarray(train.images))

    _write(root / "train" / "dog" / "1.png", _rgb(7, 12))  # a changed file invalidates the entry
    os.utime(root / "train" / "dog" / "1.png", ns=(1, 1))
    changed = load_dataset(str(root), cache_dir=cache)
    assert changed[4][0][:, 0, 0].tolist() == [7, 248, 40]
    assert len(list(cache.glob("*.images.npy"))) == 3


def test_folder_resize_and_val_fallback_to_test(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    _write(root / "train" / "a" / "wide.png", Image.new("RGB", (20, 10), (255, 0, 0)))
    _write(root / "test" / "a" / "x.png", Image.new("RGB", (30, 30), (0, 255, 0)))
    train = load_dataset(str(root), cache_dir=cache)
    assert train.image_size == 10  # shorter side of the first image
    val = load_dataset(str(root), "val", image_size=8, cache_dir=cache)
    assert val[0][0].shape == (3, 8, 8) and val[0][0][:, 4, 4].tolist() == [0, 255, 0]


def test_folder_decode_in_pool_surfaces_data_error(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data", per_class=2, val=False)
    scan = ds_mod.Scan(root.resolve(), "train")
    out = np.zeros((len(scan.files), 12, 12, 3), dtype=np.uint8)
    assert cache_mod._decode_files(scan.files, 12, out, skip_bad=False, workers=2) == []
    assert out[2, 0, 0].tolist() == [60, 195, 40]
    bad = root / "train" / "dog" / "0.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=str(bad)):
        cache_mod._decode_files(scan.files, 12, out, skip_bad=False, workers=2)


def test_large_images_stream(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    for c in ("a", "b"):
        _write(root / "train" / c / "0.jpg", Image.new("RGB", (130, 100), (10, 20, 30)))
    stream = load_dataset(str(root), cache_dir=cache)
    assert isinstance(stream, FolderStream) and stream.image_size == 224 and stream.labels.tolist() == [0, 1]
    image, label = stream[1]
    assert image.shape == (3, 224, 224) and image.dtype == torch.uint8 and label == 1
    assert not cache.exists()


# -------------------------------------------------------------------------------------------- bad input


def test_missing_root(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_dataset(str(tmp_path / "nope"), cache_dir=cache)


def test_no_train_dir_or_no_class_folders(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(DataError, match=r"root/train/<class>/<image>"):
        load_dataset(str(tmp_path), cache_dir=cache)
    _write(tmp_path / "train" / "loose.png", _rgb(1))
    with pytest.raises(DataError, match=rf"{tmp_path / 'train'} has no class folders"):
        load_dataset(str(tmp_path), cache_dir=cache)


def test_empty_class(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data")
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=rf"{root / 'train' / 'empty'} has no images"):
        load_dataset(str(root), cache_dir=cache)


def test_val_class_not_in_train(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data")
    _write(root / "val" / "zebra" / "0.png", _rgb(1))
    with pytest.raises(DataError, match="zebra"):
        load_dataset(str(root), "val", cache_dir=cache)


def test_truncated_jpeg(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data")
    bad = _write(root / "train" / "dog" / "cut.jpg", Image.effect_noise((64, 64), 60).convert("RGB"))
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{bad} is corrupt or truncated"):
        load_dataset(str(root), cache_dir=cache)
    assert not list(cache.glob("*.npy"))  # nothing half-built is left behind


def test_non_image_file(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data")
    notes = root / "train" / "cat" / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(DataError, match=rf"{notes} is not an image file"):
        load_dataset(str(root), cache_dir=cache)
    notes.unlink()
    fake = root / "train" / "cat" / "fake.png"
    fake.write_text("hello")
    with pytest.raises(DataError, match=rf"{fake} is not a readable image"):
        load_dataset(str(root), cache_dir=cache)


def test_skip_bad_skips_and_counts(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data")
    (root / "train" / "cat" / "notes.txt").write_text("hello")
    (root / "train" / "dog" / "fake.png").write_text("hello")
    with pytest.warns(UserWarning, match=r"skipped 2 bad file\(s\).*notes\.txt"):
        ds = load_dataset(str(root), cache_dir=cache, skip_bad=True)
    assert len(ds) == 9 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.warns(UserWarning, match=r"skipped 2 bad file"):  # also when read from the cache
        load_dataset(str(root), cache_dir=cache, skip_bad=True)
    with pytest.raises(DataError):  # the skip_bad cache never hides bad files from a strict load
        load_dataset(str(root), cache_dir=cache)


def test_skip_bad_with_nothing_left(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "a" / "x.png").write_text("hello")
    with pytest.raises(DataError, match="no readable image"):
        load_dataset(str(root), cache_dir=cache, skip_bad=True)


def test_torchvision_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"{tmp_path}.*never downloads"):
        load_dataset(f"cifar10:{tmp_path}")


# -------------------------------------------------------------------------------------------- image modes


@pytest.mark.parametrize(
    ("mode", "make", "expected"),
    [
        ("L", lambda: Image.new("L", (12, 12), 100), [100, 100, 100]),
        ("LA", lambda: Image.new("LA", (12, 12), (100, 50)), [100, 100, 100]),
        ("RGBA", lambda: Image.new("RGBA", (12, 12), (10, 20, 30, 128)), [10, 20, 30]),
        ("P", lambda: Image.new("RGB", (12, 12), (10, 20, 30)).quantize(4), [10, 20, 30]),
        ("CMYK", lambda: Image.new("CMYK", (12, 12), (0, 0, 0, 0)), [255, 255, 255]),
        ("I;16 max", lambda: Image.fromarray(np.full((12, 12), 65535, np.uint16)), [255, 255, 255]),
        ("I;16 half", lambda: Image.fromarray(np.full((12, 12), 32768, np.uint16)), [128, 128, 128]),
    ],
)
def test_image_modes_convert_to_rgb(tmp_path: Path, mode: str, make, expected: list[int]) -> None:
    ext = ".tif" if mode.startswith(("CMYK", "LA")) else ".png"
    path = _write(tmp_path / f"img{ext}", make())
    image = ds_mod.load_image(path, 12)
    assert image.shape == (12, 12, 3) and image.dtype == np.uint8
    assert np.abs(image[5, 5].astype(int) - expected).max() <= 1


def test_sixteen_bit_folder(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    _write(root / "train" / "a" / "x.png", Image.fromarray(np.full((12, 12), 32768, np.uint16)))
    _write(root / "train" / "b" / "y.png", Image.new("L", (12, 12), 7))
    ds = load_dataset(str(root), cache_dir=cache)
    assert ds[0][0][:, 0, 0].tolist() == [128, 128, 128] and ds[1][0][:, 0, 0].tolist() == [7, 7, 7]


# -------------------------------------------------------------------------------------------- DataModule


def test_datamodule_digits() -> None:
    dm = SelfSupDataModule(batch_size=64, image_size=16)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.image_size == 16 and len(dm.val_set) == 360
    train = dm.train_dataloader()
    images, labels = next(iter(train))
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert train.drop_last and train.batch_size == 64 and train.num_workers == 0
    val_batches = list(dm.val_dataloader())
    assert sum(len(y) for _, y in val_batches) == 360


def test_datamodule_folder_without_val(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data", val=False)
    dm = SelfSupDataModule(str(root), batch_size=4, cache_dir=str(cache))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.val_set is None and dm.val_dataloader() == [] and dm.num_classes == 3
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 12, 12) and batches[0][1].dtype == torch.int64
    small = SelfSupDataModule(str(root), batch_size=64, cache_dir=str(cache))
    small.setup("fit")
    assert not small.train_dataloader().drop_last  # one partial batch is kept


def test_datamodule_stream_loader(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path / "data", val=False)
    dm = SelfSupDataModule(str(root), batch_size=4, image_size=100, num_workers=0, cache_dir=str(cache))
    dm.setup("fit")
    assert isinstance(dm.train_set, FolderStream)
    images, labels = next(iter(dm.dataloader("train")))
    assert images.shape == (4, 3, 100, 100) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    bad = root / "train" / "cat" / "0.png"
    bad.write_bytes(b"broken")
    loader = SelfSupDataModule(str(root), batch_size=4, image_size=100, num_workers=1, cache_dir=str(cache))
    loader.setup("fit")
    with pytest.raises(DataError, match=str(bad)):  # raised in a worker, re-raised as DataError here
        list(loader.dataloader("train"))


# -------------------------------------------------------------------------------------------- augment


@pytest.mark.parametrize("kwargs", [{}, {"color_jitter": 0.4, "grayscale_p": 0.5, "flip": False}])
def test_make_augment(kwargs: dict) -> None:
    torch.manual_seed(0)
    aug = make_augment(16, **kwargs)
    x = torch.rand(6, 3, 24, 24)
    y = aug(x)
    assert y.shape == (6, 3, 16, 16) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.allclose(y[0], y[1])  # per-sample parameters on different inputs


def test_make_augment_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        make_augment(16, crop_scale=(0.8, 0.2))
