import torch

from selfsup.pretext.rotation import Rotation, rotate_batch
from tests.conftest import fixed_batch, loss_before_and_after_one_step


def test_rotation_labels_and_inverse():
    x = torch.randn(3, 2, 5, 5)
    rotated, labels = rotate_batch(x)
    assert rotated.shape == (12, 2, 5, 5)
    for k in range(4):
        block = rotated[k * 3 : (k + 1) * 3]
        assert (labels[k * 3 : (k + 1) * 3] == k).all()
        torch.testing.assert_close(block, torch.rot90(x, k, dims=(2, 3)))
        # rotating back by k quarter turns recovers the input exactly
        torch.testing.assert_close(torch.rot90(block, -k, dims=(2, 3)), x)


def test_rotation_label_one_is_a_quarter_turn():
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 0, 2] = 1  # top-right pixel
    rotated, labels = rotate_batch(x)
    # one counter-clockwise quarter turn moves top-right to top-left
    assert labels[1] == 1 and rotated[1, 0, 0, 0] == 1


def test_one_step_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = Rotation(backbone="convnet_small", optimizer="adamw", lr=1e-3, crop_scale=1.0, flip=False)
    before, after = loss_before_and_after_one_step(model, fixed_batch())
    assert after < before


def test_loss_returns_features_for_online_probe():
    model = Rotation(backbone="convnet_small")
    out = model.loss(fixed_batch())
    assert out["features"].shape == (16, model.num_features)
    assert not out["features"].requires_grad
    assert out["loss"].ndim == 0
