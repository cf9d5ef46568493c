"""The shared backbone: any timm model or a registered small CIFAR-style net.

Every method in selfsup owns one :class:`Backbone` and talks to it through ``forward_features`` (the
feature map), ``forward`` (the pooled vector) and ``num_features``; a method that probes every stage
(DCGAN, as Radford et al. did) uses ``forward_intermediates`` and ``stage_channels``, timm's own API.
timm models are always built with ``pretrained=False``: selfsup never downloads weights.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
from torch import nn

from selfsup.errors import ConfigError

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
"""Small nets registered by selfsup, by name. Any timm model name is accepted besides these."""


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a small-net factory ``fn(in_chans, norm_layer) -> nn.Module`` under its name."""
    BACKBONES[fn.__name__] = fn
    return fn


class LayerNorm2d(nn.GroupNorm):
    """Layer norm over (C, H, W) of a feature map, with a per-channel affine (CPC v2's choice).

    - [0] CPC v2, 2019, https://arxiv.org/abs/1905.09272
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__(1, num_channels, eps=eps, device=device, dtype=dtype)


class GroupNorm2d(nn.GroupNorm):
    """Group norm with up to 32 groups (fewer when the channel count is not divisible)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if num_channels % g == 0)
        super().__init__(groups, num_channels, eps=eps, device=device, dtype=dtype)


NORMS: dict[str, type[nn.Module]] = {"batch": nn.BatchNorm2d, "group": GroupNorm2d, "layer": LayerNorm2d}


def _conv_block(cin: int, cout: int, stride: int, norm_layer: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), norm_layer(cout), nn.ReLU(inplace=True)
    )


class ConvNetSmall(nn.Module):
    """Four 3x3 conv blocks (32-64-128-128 channels, three stride-2), global average pool: for fast CPU tests.

    Its ``feature_info`` and ``forward_intermediates`` follow timm's API: every block is a stage.
    """

    def __init__(self, in_chans: int = 3, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        widths = (32, 64, 128, 128)
        layers, cin = [], in_chans
        for i, w in enumerate(widths):
            layers.append(_conv_block(cin, w, 1 if i == 0 else 2, norm_layer))
            cin = w
        self.features = nn.Sequential(*layers)
        self.num_features = widths[-1]
        self.feature_info = [
            {"num_chs": w, "reduction": 2 ** i, "module": f"features.{i}"} for i, w in enumerate(widths)
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Forward pass through feature extraction layers."""
        return self.features(x)

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward features that returns intermediates: the last map and every block's output."""
        intermediates = []
        for block in self.features:
            x = block(x)
            intermediates.append(x)
        return x, intermediates

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Global average pool of the feature map."""
        return x.mean(dim=(2, 3))


@register_backbone
def convnet_small(in_chans: int = 3, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    """A 4-layer conv net (128 features) for fast CPU tests."""
    return ConvNetSmall(in_chans, norm_layer)


@register_backbone
def cifar_resnet18(in_chans: int = 3, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, the usual variant for 32 px images."""
    model = timm.models.resnet.ResNet(
        block=timm.models.resnet.BasicBlock, layers=(2, 2, 2, 2), in_chans=in_chans, num_classes=0,
        norm_layer=norm_layer,
    )
    model.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class Backbone(nn.Module):
    """A feature extractor built by name: a registered small net or any timm model.

    Args:
        name: a name in :data:`BACKBONES` (``convnet_small``, ``cifar_resnet18``) or any timm model name.
        in_chans: input channels (1 for colorization's L channel).
        norm: normalisation layer, one of ``batch``, ``group``, ``layer``; ``None`` keeps the model's own.

    Shape:
        - forward_features: ``(B, in_chans, H, W) -> (B, C, h, w)`` (tokens ``(B, N, C)`` for ViTs)
        - forward: ``(B, in_chans, H, W) -> (B, num_features)``
        - forward_intermediates: ``(B, in_chans, H, W)`` -> the map of ``forward_features`` and a list
          with one ``(B, stage_channels[i], h_i, w_i)`` map per stage

    >>> net = Backbone("convnet_small")
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 128])
    """

    def __init__(self, name: str, in_chans: int = 3, norm: str | None = None) -> None:
        super().__init__()
        if norm is not None and norm not in NORMS:
            raise ConfigError(f"norm must be one of {sorted(NORMS)} or None, got {norm!r}")
        norm_kw = {} if norm is None else {"norm_layer": NORMS[norm]}
        if name in BACKBONES:
            self.model = BACKBONES[name](in_chans=in_chans, **norm_kw)
        elif timm.is_model(name):
            try:
                self.model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **norm_kw)
            except TypeError as e:
                raise ConfigError(f"timm model {name!r} does not accept norm={norm!r}: {e}") from None
        else:
            raise ConfigError(
                f"unknown backbone {name!r}: use one of {sorted(BACKBONES)} or a timm model name "
                "(python -c 'import timm; print(timm.list_models())')"
            )
        self.name, self.in_chans, self.norm = name, in_chans, norm
        self.num_features: int = self.model.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Forward pass through feature extraction layers."""
        return self.model.forward_features(x)

    @property
    def has_stages(self) -> bool:
        """Whether the model exposes its stages: timm's ``forward_intermediates`` and a ``feature_info`` list."""
        info = getattr(self.model, "feature_info", None)
        return hasattr(self.model, "forward_intermediates") and isinstance(info, list) and len(info) > 0

    @property
    def stage_channels(self) -> list[int]:
        """Channels of each stage output of :meth:`forward_intermediates`, from the model's ``feature_info``."""
        if not self.has_stages:
            raise ConfigError(f"backbone {self.name!r} does not expose its stages (timm's forward_intermediates "
                              "and feature_info)")
        return [int(stage["num_chs"]) for stage in self.model.feature_info]

    @property
    def stage_names(self) -> list[str]:
        """Module name of each stage output of :meth:`forward_intermediates` (``layer1`` ... on ResNets)."""
        self.stage_channels  # noqa: B018 - raises the one-line error of a backbone without stages
        return [str(stage.get("module", f"stage{i}")) for i, stage in enumerate(self.model.feature_info)]

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One pass: the feature map of :meth:`forward_features` and every stage's output (NCHW)."""
        return self.model.forward_intermediates(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Pool a feature map from :meth:`forward_features` into one vector per image."""
        return self.model.forward_head(features, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)``."""
        return self.pool(self.forward_features(x))
