"""Views from the whole image: random-resized crops for training, the standard centre crop for evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import SelfSupDataModule, load_dataset
from selfsup.data.decode import decode_view
from selfsup.data.geometry import EvalCrop, TrainCrop, WholeImage, draw_rng, reduction
from selfsup.data.sampler import SampleIndex
from selfsup.data.stream import FolderStream
from selfsup.errors import ConfigError, DataError

THIRDS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def thirds_image(width: int = 300, height: int = 225) -> Image.Image:
    """Left, middle and right thirds in red, green and blue."""
    a = np.zeros((height, width, 3), np.uint8)
    for k, colour in enumerate(THIRDS):
        a[:, k * width // 3 : (k + 1) * width // 3] = colour
    return Image.fromarray(a)


def thirds_folder(root: Path, fmt: str = "png", n: int = 2) -> Path:
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            thirds_image().save(root / "train" / c / f"{i}.{fmt}")
    return root


def colour_shares(view: torch.Tensor) -> np.ndarray:
    """Fraction of a view's pixels that are mostly red, green, blue."""
    dominant = view.float().argmax(0)  # (S, S) channel index
    return np.array([(dominant == k).float().mean().item() for k in range(3)])


def test_training_crops_cover_the_whole_image(tmp_path: Path) -> None:
    root = thirds_folder(tmp_path / "data")
    stream = load_dataset(str(root), image_size=100)
    assert isinstance(stream, FolderStream)
    train = stream.training_views(TrainCrop(100, scale=(0.08, 1.0)), seed=0)
    shares = np.stack([colour_shares(train[SampleIndex(0, e)][0]) for e in range(300)])  # (300, 3)
    # Some crops lie inside the left third and some inside the right third: the whole image is used.
    assert (shares[:, 0] > 0.95).any() and (shares[:, 2] > 0.95).any()
    assert shares[:, 0].max() > 0.95 and (shares[:, 1] > 0.95).any()
    # The evaluation view is the centre square: never the outer columns of a 4:3 image.
    centre = colour_shares(stream[0][0])
    assert centre[1] > 0.4 and centre[0] < 0.3 and centre[2] < 0.3 and abs(centre[0] - centre[2]) < 0.02


def test_crops_are_drawn_from_seed_epoch_and_index(tmp_path: Path) -> None:
    root = thirds_folder(tmp_path / "data", fmt="jpg")
    train = load_dataset(str(root), image_size=100).training_views(TrainCrop(100, (0.2, 1.0)), seed=3)
    a, b = train[SampleIndex(1, 4)][0], train[SampleIndex(1, 4)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, train[SampleIndex(1, 5)][0])  # another epoch, another crop
    loaders = [
        torch.utils.data.DataLoader(train, batch_size=2, sampler=[SampleIndex(i, 7) for i in range(4)], num_workers=w)
        for w in (0, 2)
    ]
    (x0, _), (x1, _) = (next(iter(loader)) for loader in loaders)
    assert torch.equal(x0, x1)  # the same crops whichever process decodes them


def test_random_box_stays_inside_and_follows_ranges() -> None:
    crop, rng = TrainCrop(32, (0.25, 0.5), (0.5, 2.0)), draw_rng(0, 0, 0)
    for _ in range(200):
        box = crop.box(120, 200, rng)
        assert 0 <= box.top and box.top + box.height <= 120 and 0 <= box.left and box.left + box.width <= 200
        assert 0.24 <= box.height * box.width / (120 * 200) <= 0.51
        assert 0.49 <= box.width / box.height <= 2.05
    # crop_scale 1: the centred largest square, as the methods without random crops expect
    square = TrainCrop.for_method(32, 1.0).box(120, 200, rng)
    assert (square.top, square.left, square.height, square.width) == (0, 40, 120, 120)
    with pytest.raises(ConfigError, match="crop scale"):
        TrainCrop(32, (0.0, 1.0))
    with pytest.raises(ConfigError, match="crop_pct"):
        EvalCrop(32, 1.5)


def test_eval_crop_equals_torchvision_resize_centre_crop(tmp_path: Path) -> None:
    from torchvision.transforms import v2

    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    smooth = np.stack([xx / 500 * 255, yy / 375 * 255, 128 + 100 * np.sin(xx / 37) * np.cos(yy / 23)], -1)
    path = tmp_path / "smooth.png"
    Image.fromarray(smooth.round().astype(np.uint8)).save(path)
    ours = decode_view(path, EvalCrop(224, 0.875)).int()
    tv = v2.Compose([v2.PILToTensor(), v2.Resize(256, antialias=True), v2.CenterCrop(224)])(Image.open(path)).int()
    diff = (ours - tv).abs().float()
    assert ours.shape == tv.shape == (3, 224, 224)
    assert diff.mean() < 1.5 and diff.max() <= 8  # the crop lands within a pixel; only resampling differs


def test_reduced_scale_decode_matches_full_decode(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:400, 0:640].astype(np.float32)
    a = np.stack([xx / 640 * 255, yy / 400 * 255, 128 + 60 * np.sin(xx / 50)], -1).round().astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(a).save(path, quality=95)
    place = EvalCrop(64, 1.0)
    assert reduction(place.box(400, 640), 64) == 4  # a 400 px box for 64 px: decoded at 1/4
    fast, full = decode_view(path, place).int(), decode_view(path, place, reduce=False).int()
    assert (fast - full).abs().float().mean() < 2.0


def test_small_cache_keeps_non_square_images_whole(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    thirds_image(48, 16).save(root / "train" / "a" / "0.png")
    Image.new("RGB", (16, 16)).save(root / "train" / "a" / "1.png")
    with pytest.warns(UserWarning, match=r"1 of 2 images .* not square: the cache keeps each whole.*3.00:1"):
        cached = load_dataset(str(root), image_size=16, cache_dir=tmp_path / "cache")
    shares = colour_shares(cached[0][0])
    assert all(abs(s - 1 / 3) < 0.05 for s in shares)  # all three thirds are there
    assert torch.equal(decode_view(root / "train" / "a" / "0.png", WholeImage(16)), cached[0][0])


def test_datamodule_crops_streamed_folders_in_the_loader(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from selfsup.train import build_method

    root = thirds_folder(tmp_path / "data", n=3)
    dm = SelfSupDataModule(str(root), batch_size=2, image_size=100, num_workers=0, crop_pct=0.5, seed=1)
    dm.setup("fit")
    assert dm.train_set.eval_crop == EvalCrop(100, 0.5) and "crop_pct=0.5" in dm.train_set.transform
    model = build_method("rotation", {"backbone": "convnet_small", "crop_scale": 0.1})
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    dm.trainer = trainer
    loader = dm.train_dataloader()
    assert loader.dataset.train_crop == TrainCrop(100, (0.1, 1.0)) and model.crops_in_loader
    views = torch.cat([x for x, _ in loader])
    assert views.shape == (6, 3, 100, 100)
    assert not all(torch.equal(v, views[0]) for v in views[1:])  # six random crops of one picture
    model.train()
    flipped = model.augment(views[:2])
    assert flipped.shape == (2, 3, 100, 100)  # the method only flips: no second crop
    assert all(torch.equal(f, v / 255.0) or torch.equal(f, v.flip(-1) / 255.0) for f, v in zip(flipped, views[:2], strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["loader", "device"])
def test_pretrain_on_streamed_folder_records_crop_pct(tmp_path: Path, decode: str) -> None:
    import json

    from selfsup.train import pretrain
    from tests.conftest import run_cli_here

    root = thirds_folder(tmp_path / "data", fmt="jpg", n=3)
    for c in ("a", "b"):
        (root / "val" / c).mkdir(parents=True)
        thirds_image().save(root / "val" / c / "0.jpg")
    cfg = {"model": {"backbone": "convnet_small", "crop_scale": 0.3},
           "data": {"data": str(root), "image_size": 97, "batch_size": 3, "num_workers": 0, "crop_pct": 0.5,
                    "decode": decode},
           "trainer": {"max_steps": 2}, "output": str(tmp_path / "runs"), "name": "r", "online_probe": False}
    run = pretrain(cfg).run_dir
    assert json.loads((run / "export" / "config.json").read_text())["data"]["crop_pct"] == 0.5
    proc = run_cli_here("knn", str(run), "--no-baselines", "--k", "3", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(next((run / "eval").glob("knn*.json")).read_text())
    assert "crop_pct=0.5" in json.dumps(rows["provenance"])


def test_device_decode_gives_the_loader_views(tmp_path: Path) -> None:
    """``--decode device`` on the CPU: workers read bytes, the device path cuts the same crops."""
    root = thirds_folder(tmp_path / "data", fmt="jpg", n=3)
    (root / "train" / "a" / "x.png").write_bytes((root / "train" / "a" / "0.jpg").read_bytes())  # a JPEG named .png
    Image.new("RGB", (150, 120), (9, 99, 199)).save(root / "train" / "b" / "y.png")  # a real PNG
    views = {}
    for mode in ("loader", "device"):
        dm = SelfSupDataModule(str(root), batch_size=4, image_size=100, num_workers=1, decode=mode, seed=2)
        dm.setup("fit")
        stream = dm.train_set.training_views(TrainCrop(100, (0.2, 1.0)), seed=2)
        dm._train = stream  # what train_dataloader gives under a Trainer
        loader = dm.dataloader("train", shuffle=False)
        views[mode] = [dm.on_before_batch_transfer(b, 0) for b in loader]
    for (a, ya), (b, yb) in zip(views["loader"], views["device"], strict=True):
        assert a.shape == b.shape and torch.equal(ya, yb)
        assert (a.int() - b.int()).abs().max() <= 1  # the same boxes; only the JPEG decoder's rounding may differ


def test_device_decode_names_a_bad_file_or_skips_it(tmp_path: Path) -> None:
    root = thirds_folder(tmp_path / "data", fmt="jpg", n=2)
    bad = root / "train" / "b" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    dm = SelfSupDataModule(str(root), batch_size=4, image_size=100, num_workers=0, decode="device")
    dm.setup("fit")
    batch = next(iter(dm.dataloader("train", shuffle=False)))
    with pytest.raises(DataError, match="1.jpg is corrupt or truncated"):
        dm.on_before_batch_transfer(batch, 0)
    dm = SelfSupDataModule(str(root), batch_size=4, image_size=100, num_workers=0, decode="device", skip_bad=True)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="skipped 1 bad image"):
        images, labels = dm.on_before_batch_transfer(next(iter(dm.dataloader("train", shuffle=False))), 0)
    assert images.shape == (3, 3, 100, 100) and labels.tolist() == [0, 0, 1]
    with pytest.raises(ConfigError, match="decode must be one of"):
        SelfSupDataModule(str(root), decode="gpu")
