import pytest
import torch

from selfsup.errors import ConfigError
from selfsup.ssl.backbone import BACKBONES, Backbone, LayerNorm2d


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("in_chans", [1, 3])
def test_registered_backbones_shapes_and_grads(name, in_chans):
    net = Backbone(name, in_chans=in_chans)
    x = torch.randn(2, in_chans, 32, 32)
    fmap = net.forward_features(x)
    assert fmap.ndim == 4 and fmap.shape[:2] == (2, net.num_features)
    pooled = net(x)
    assert pooled.shape == (2, net.num_features)
    pooled.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_cifar_resnet18_keeps_resolution_in_stem():
    net = Backbone("cifar_resnet18")
    assert net.num_features == 512
    # 3x3 stride-1 stem, no max-pool: 32 px -> 4x4 after the three stride-2 stages.
    assert net.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)


def test_timm_model_by_name():
    net = Backbone("resnet18", in_chans=1)
    assert net.num_features == 512
    assert net(torch.randn(2, 1, 64, 64)).shape == (2, 512)


@pytest.mark.parametrize("norm,cls", [("layer", LayerNorm2d), ("group", torch.nn.GroupNorm), ("batch", torch.nn.BatchNorm2d)])
@pytest.mark.parametrize("name", ["convnet_small", "cifar_resnet18", "resnet18"])
def test_norm_layer_is_swapped(name, norm, cls):
    net = Backbone(name, norm=norm)
    norms = [m for m in net.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    assert norms and all(isinstance(m, cls) for m in norms)


def test_layer_norm_has_no_batch_interaction():
    net = Backbone("convnet_small", norm="layer").train()
    x = torch.randn(4, 3, 16, 16)
    alone = net(x[:1])
    together = net(x)[:1]
    torch.testing.assert_close(alone, together)


def test_bad_names_fail_clearly():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet_typo'"):
        Backbone("resnet_typo")
    with pytest.raises(ConfigError, match="norm must be one of"):
        Backbone("convnet_small", norm="instance")


@pytest.mark.parametrize(("name", "size", "reductions"), [("convnet_small", 16, [1, 2, 4, 8]),
                                                          ("cifar_resnet18", 16, [1, 1, 2, 4, 8]),
                                                          ("resnet18", 32, [2, 4, 8, 16, 32])])
def test_forward_intermediates_gives_every_stage_and_the_feature_map(name, size, reductions):
    net = Backbone(name).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        last, stages = net.forward_intermediates(x)
        assert torch.equal(last, net.forward_features(x))  # one pass gives both
    assert net.has_stages and [s.shape[1] for s in stages] == net.stage_channels
    assert [size // s.shape[-1] for s in stages] == reductions and stages[-1].shape[1] == net.num_features
