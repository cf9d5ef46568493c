"""Layer-wise linear evaluation: every stage of an encoder, read in one forward pass, pooled to ~9,000 dims.

The pretext-task papers probed every layer, not only the last: Zhang et al. (colorization) and Noroozi &
Favaro (jigsaw) train a linear classifier on each conv layer, Gidaris et al. (rotation) find the best
features in the middle blocks, and Goyal et al. [0] (the protocol VISSL ships) average-pool each ResNet
stage's feature map so that it has about 9,000 dimensions and probe each. This module reads the stages and
pools them that way; :func:`selfsup.extract_features` caches one feature file per layer and the probe,
kNN and sweep run on each (``--layers`` on the CLI).

The stage interface (any method's encoder can expose it)
--------------------------------------------------------
An encoder opts in by defining ``forward_stages(x) -> dict[str, Tensor]``: for RGB images ``x``
``(B, 3, H, W)`` in [0, 1] (or uint8), the named intermediate outputs of one forward pass, ordered from
shallow to deep, each a map ``(B, C, h, w)`` (pooled here to ~9,000 dims) or a vector ``(B, D)`` (taken
as it is), and ending with ``"out"``: exactly what ``encoder(x)`` returns (what ``selfsup probe`` probes
without ``--layers``). :class:`~selfsup.ssl.module.ImageEncoder` implements it from the backbone's
stages (timm's ``forward_intermediates`` and ``feature_info``: names are the stages' module names,
``layer1`` ... ``layer4`` on ResNets). An encoder without it has one layer, ``"out"``.

Layer selection (:func:`select_layers`): ``all``; ``last`` (``"out"``); ``best`` (resolved by the caller:
the layer whose full-label probe scored best on held-out *training* labels); or a comma-separated list of
names and stage indices (0-based positions in the ``forward_stages`` order, so on a timm ResNet index ``i``
is ``layer{i}`` and 0 the stem).

- [0] Scaling and Benchmarking Self-Supervised Visual Representation Learning, Goyal et al. 2019,
  https://arxiv.org/abs/1905.01235
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.errors import ConfigError

TARGET_DIM = 9000
"""Dimensions each stage map is average-pooled to, about (Goyal et al. 2019: 9,216 for ResNet-50's res4)."""

LAST = "out"
"""The name of an encoder's own output (the features ``selfsup probe`` probes without ``--layers``)."""

POOLING_ID = f"adaptive-avg-pool to ~{TARGET_DIM} dims (Goyal et al. 2019)/v1"


def read_stages(encoder: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The encoder's named stage outputs of one forward pass (``forward_stages``), else ``{"out": encoder(x)}``."""
    fn = getattr(encoder, "forward_stages", None)
    if fn is None:
        return {LAST: encoder(x)}
    stages = fn(x)
    if not isinstance(stages, dict) or LAST not in stages:
        raise ConfigError(f"{type(encoder).__name__}.forward_stages must return a dict of named outputs ending "
                          f"with {LAST!r}, got {type(stages).__name__}")
    return stages


def pool_grid(channels: int, height: int, width: int, target: int = TARGET_DIM) -> tuple[int, int]:
    """Output size of the average pool of a ``(C, h, w)`` map: the square grid of about ``target / C`` cells,
    never larger than the map itself (a map smaller than the target is kept whole)."""
    side = max(1, round(math.sqrt(target / max(1, channels))))
    return min(side, height), min(side, width)


def pool_stage(t: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """``(B, C, h, w)`` -> average-pooled to ``grid`` and flattened ``(B, C * gh * gw)``; a ``(B, D)`` vector as is."""
    if t.ndim == 2:
        return t
    if (t.shape[-2], t.shape[-1]) != grid:
        t = F.adaptive_avg_pool2d(t, grid)  # (B, C, h, w) -> (B, C, gh, gw)
    return t.flatten(1)  # (B, C, gh, gw) -> (B, C*gh*gw)


@dataclass
class LayerPlan:
    """The layers read from an encoder: names (in stage order), each one's pooling grid and feature size."""

    names: list[str]
    grids: dict[str, tuple[int, int] | None]  # None: a vector, taken as it is
    dims: dict[str, int]
    available: list[str]  # every layer the encoder exposes, in order

    def pooling(self, name: str) -> str:
        """How a layer was pooled, for the provenance: ``avgpool 3x3 of (1024, 14, 14)`` style."""
        grid = self.grids[name]
        return "as returned (a vector)" if grid is None else f"adaptive average pool to {grid[0]}x{grid[1]}"


def select_layers(spec: str | list[str] | None, available: list[str]) -> list[str]:
    """Resolve a ``--layers`` value against the encoder's layers (in stage order).

    ``None`` or ``last``: ``["out"]``; ``all``: every layer; else names and 0-based stage indices,
    comma-separated or as a list. ``best`` must be resolved by the caller (it needs a probe).

    Raises:
        ConfigError: an unknown name, an index out of range, ``best`` here, or an empty list.
    """
    if spec is None:
        return [LAST]
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if not items:
        raise ConfigError("--layers is empty: give all, last, best, stage indices (e.g. 2,3,4) or names")
    chosen: list[str] = []
    for item in items:
        item = str(item)
        if item == "all":
            chosen.extend(available)
        elif item == "last":
            chosen.append(LAST)
        elif item == "best":
            raise ConfigError("--layers best is chosen by a probe: only `selfsup sweep` takes it")
        elif item in available:
            chosen.append(item)
        elif item.lstrip("-").isdigit():
            i = int(item)
            if not 0 <= i < len(available):
                raise ConfigError(f"--layers {item}: stage index out of range; this encoder has {len(available)} "
                                  f"layers, 0-{len(available) - 1}: {', '.join(available)}")
            chosen.append(available[i])
        else:
            raise ConfigError(f"--layers {item!r}: no such layer; this encoder has {', '.join(available)} "
                              "(or give all, last, or 0-based stage indices)")
    return [n for n in available if n in set(chosen)]  # stage order, each once


@torch.no_grad()
def plan_layers(encoder: nn.Module, image_shape: tuple[int, int, int], spec: str | list[str] | None,
                target: int = TARGET_DIM) -> LayerPlan:
    """Which layers ``spec`` selects, and how each is pooled, from one forward pass of one blank image.

    The encoder is run in eval mode on a zero image of ``image_shape`` ``(C, H, W)`` (the data's): stage
    sizes depend on the image size, so they are read, not computed.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        param = next(iter(encoder.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        stages = read_stages(encoder, torch.zeros(1, *image_shape, device=device))
    finally:
        encoder.train(was_training)
    available = list(stages)
    names = select_layers(spec, available)
    grids: dict[str, tuple[int, int] | None] = {}
    dims: dict[str, int] = {}
    for name in names:
        t = stages[name]
        if t.ndim == 4:
            grids[name] = pool_grid(t.shape[1], t.shape[2], t.shape[3], target)
            dims[name] = int(t.shape[1] * grids[name][0] * grids[name][1])
        elif t.ndim == 2:
            grids[name], dims[name] = None, int(t.shape[1])
        else:
            raise ConfigError(f"layer {name!r} has shape {tuple(t.shape)}: forward_stages must give (B, C, h, w) "
                              "maps or (B, D) vectors")
    return LayerPlan(names, grids, dims, available)


class LayerEncoder(nn.Module):
    """The selected layers of an encoder, each pooled per its :class:`LayerPlan`, concatenated in plan order.

    One forward pass of the wrapped encoder gives every layer; the extractor splits the columns back into
    one cache file per layer.

    Shape:
        - Input: ``(B, 3, H, W)`` -> Output: ``(B, sum(plan.dims.values()))``
    """

    def __init__(self, encoder: nn.Module, plan: LayerPlan) -> None:
        super().__init__()
        self.encoder, self.plan = encoder, plan
        self.num_features = sum(plan.dims.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = read_stages(self.encoder, x)
        return torch.cat([pool_stage(stages[n], self.plan.grids[n]).float() for n in self.plan.names], dim=1)
