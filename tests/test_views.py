"""``selfsup plot RUN augmentations``: the views a method's network really reads, caught at its backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.datasets import load_dataset
from selfsup.eval.views import method_views, views_figure
from selfsup.ssl.module import build_method
from tests.conftest import run_cli_here


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train", image_size=16)


def test_rotation_views_are_the_four_turns_of_one_augmented_image(digits):
    model = build_method("rotation", {"backbone": "convnet_small"})
    (item,) = method_views(model, digits, count=1, name="rotation")
    (label, v), = item.views
    assert label == "rotation" and v.shape == (4, 3, 16, 16)
    for k in range(4):  # view k is view 0 turned k times: the capture kept the order the network reads
        assert torch.allclose(v[k], torch.rot90(v[0], k, dims=(1, 2)), atol=1e-5)
    assert item.loaded.dtype == torch.uint8 and item.loaded.shape == (3, 16, 16)


def test_jigsaw_views_are_nine_tiles_each_normalised_on_its_own(digits):
    model = build_method("jigsaw", {"backbone": "convnet_small", "channel_jitter": 0, "grayscale": 0.0, "color_drop": 0.0})
    (item,) = method_views(model, digits, count=1, name="jigsaw")
    (_, v), = item.views
    assert v.shape[0] == 9
    means = v.mean(dim=(2, 3))  # per tile and channel: ~0 after per-tile normalisation, whatever the image
    assert means.abs().max() < 1e-3


def test_multitask_views_are_labelled_by_task_and_the_model_is_left_as_it_was(digits):
    model = build_method("multitask", {"backbone": "convnet_small", "tasks": "rotation,jigsaw"})
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    items = method_views(model, digits, count=2, name="multitask")
    assert [label for label, _ in items[0].views] == ["rotation", "jigsaw"]
    assert [tuple(v.shape[:1]) for _, v in items[0].views] == [(4,), (9,)]
    after = model.state_dict()  # batch-norm statistics untouched, no wrapper left behind, mode restored
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
    assert not {"forward", "forward_features", "forward_intermediates"} & set(vars(model.backbone))
    assert "augment" not in vars(model)


def test_a_model_that_reads_images_directly_shows_its_augmented_input(digits):
    model = build_method("flow", {})
    (item,) = method_views(model, digits, count=1, name="flow")
    (label, v), = item.views
    assert label == "flow: augmented" and v.shape == (1, 3, 16, 16)


def test_streamed_folder_views_are_random_resized_crops_of_the_whole_image(tmp_path):
    for split in ("train",):
        d = tmp_path / "imgs" / split / "a"
        d.mkdir(parents=True)
        for i in range(3):  # 4:3 images whose thirds differ in colour, larger than the small-image cache
            img = np.zeros((120, 160, 3), np.uint8)
            img[:, :53, 0] = 255
            img[:, 53:106, 1] = 255
            img[:, 106:, 2] = 255
            Image.fromarray(img).save(d / f"{i}.png")
    stream = load_dataset(str(tmp_path / "imgs"), "train", image_size=112)
    model = build_method("rotation", {"backbone": "convnet_small"})
    views = stream.training_views(model.train_crop(112), seed=0)
    items = method_views(model, views, count=3, name="rotation")
    assert all(it.loaded.shape == (3, 112, 112) for it in items)
    # the loader's random-resized crops, not the evaluation centre crop of the same images
    assert any(not torch.equal(it.loaded, stream[i][0]) for i, it in enumerate(items))
    fig = views_figure(items, stream.classes, title="t")
    assert len(fig.axes) == 3 * 2


def test_plot_augmentations_of_a_run_writes_a_png(tmp_path):
    from selfsup.train import pretrain

    cfg = {"method": "relative_position", "model": {"backbone": "convnet_small"},
           "data": {"data": "digits", "image_size": 16, "batch_size": 64}, "trainer": {"max_steps": 1},
           "online_probe": False, "output": str(tmp_path / "runs"), "name": "rp"}
    run = pretrain(cfg).run_dir
    r = run_cli_here("plot", str(run), "augmentations", "--images", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    png = run / "eval" / "augmentations.png"
    assert png.is_file() and str(png.name) in r.stdout
    with Image.open(png) as im:
        assert im.size[0] > 200 and im.size[1] > 200
    r = run_cli_here("plot", str(tmp_path / "runs" / "nope"), "augmentations", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
