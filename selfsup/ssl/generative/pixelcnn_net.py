"""The Gated PixelCNN network and its exported encoder: plain ``nn.Module``s, no Lightning.

The method (:mod:`selfsup.ssl.generative.pixelcnn`) trains this network; evaluation builds it from an
export's hparams alone (:mod:`selfsup.ssl.encoders`), so probing a PixelCNN never imports Lightning.
See :mod:`selfsup.ssl.generative.pixelcnn` for the model and its references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.ssl.generative.common import to_8bit

COLOURS = 3  # R, G, B: the order of the subpixels within a pixel


def colour_groups(n: int) -> torch.Tensor:
    """The colour (0 R, 1 G, 2 B) each of ``n`` feature channels belongs to: three contiguous thirds."""
    return torch.arange(n) * COLOURS // n


def centre_mask(in_groups: torch.Tensor, out_groups: torch.Tensor, width: int, strict: bool) -> torch.Tensor:
    """A ``(out, in, 1, width)`` 0/1 mask: every earlier column open; at the last (the current pixel) an output
    of colour ``g`` sees inputs of colours ``< g`` (``strict``, mask A) or ``<= g`` (mask B)."""
    mask = torch.ones(len(out_groups), len(in_groups), 1, width)
    seen = in_groups[None, :] < out_groups[:, None] if strict else in_groups[None, :] <= out_groups[:, None]
    mask[:, :, 0, -1] = seen.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A convolution whose weight is multiplied by a fixed 0/1 mask (not a parameter, not saved: rebuilt)."""

    def __init__(self, cin: int, cout: int, mask: torch.Tensor) -> None:
        super().__init__(cin, cout, tuple(mask.shape[-2:]))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias)


def gate(x: torch.Tensor) -> torch.Tensor:
    """``tanh(a) * sigmoid(b)`` of the two halves of the channels: ``(B, 2C, H, W) -> (B, C, H, W)``."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks [1]; the first (``first=True``) reads the image with mask A, no residual.

    Shape:
        - Input: ``v``, ``h`` ``(B, cin, H, W)`` -> Output: ``v``, ``h`` ``(B, hidden, H, W)``
    """

    def __init__(self, cin: int, hidden: int, kernel: int, first: bool) -> None:
        super().__init__()
        k2 = kernel // 2
        self.first = first
        # vertical: rows r-k2 .. r-1 of the image (first layer) or r-k2 .. r of the vertical features below it,
        # which already see only rows above: padding k2 rows on top, none below
        self.v_pad = (k2, k2, k2, 0)
        self.v_conv = nn.Conv2d(cin, 2 * hidden, (k2 if first else k2 + 1, kernel))
        self.h_pad = (k2, 0, 0, 0)  # horizontal: columns c-k2 .. c of the current row
        groups = colour_groups(hidden)
        in_groups = torch.arange(cin) if first else groups
        gate_groups = torch.cat([groups, groups])  # both halves of the gate keep the colour of their output
        self.h_conv = MaskedConv2d(cin, 2 * hidden, centre_mask(in_groups, gate_groups, k2 + 1, strict=first))
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)  # the rows above may feed every colour
        self.h_out = MaskedConv2d(hidden, hidden, centre_mask(groups, groups, 1, strict=False))

    def vertical(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vertical stack's next features and its contribution to the horizontal stack (``2 * hidden``)."""
        rows = v.shape[-2]
        vc = self.v_conv(F.pad(v, self.v_pad))[..., :rows, :]  # the first layer's extra last row is the shift
        return gate(vc), self.v_to_h(vc)

    def horizontal(self, h: torch.Tensor, from_v: torch.Tensor) -> torch.Tensor:
        """The horizontal stack's next features: each row is computed from that row alone (and ``from_v``)."""
        out = self.h_out(gate(self.h_conv(F.pad(h, self.h_pad)) + from_v))
        return out if self.first else h + out

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, from_v = self.vertical(v)
        return v, self.horizontal(h, from_v)


class GatedPixelCNN(nn.Module):
    """The network: gated layers, then ReLU, masked 1x1, ReLU, masked 1x1 to each subpixel's mixture.

    Its stages (:meth:`forward_intermediates`) are the horizontal stack after every layer; ``has_stages``,
    ``stage_channels`` and ``stage_names`` follow :class:`~selfsup.ssl.backbone.Backbone`'s stage API.

    Args:
        layers: gated layers (the first reads the image).
        hidden: channels of each stack (three colour groups).
        kernel: side of the gated layers' kernels (odd).
        first_kernel: side of the first layer's kernel (odd).
        components: logistic mixture components per subpixel.

    Shape:
        - Input: ``(B, 3, H, W)`` pixels on [-1, 1] (:func:`symmetric`)
        - Output: ``(B, 3 * 3 * components, H, W)`` mixture parameters, colour-major (the layout of
          :func:`~selfsup.ssl.generative.common.logistic_mixture_log_prob`)
    """

    has_stages = True

    def __init__(self, layers: int, hidden: int, kernel: int, first_kernel: int, components: int) -> None:
        super().__init__()
        self.hidden, self.components = hidden, components
        self.layers = nn.ModuleList(
            [GatedLayer(COLOURS, hidden, first_kernel, first=True)]
            + [GatedLayer(hidden, hidden, kernel, first=False) for _ in range(layers - 1)]
        )
        groups = colour_groups(hidden)
        out = COLOURS * 3 * components
        out_groups = torch.arange(out) // (3 * components)  # channel c * 3K + ... belongs to colour c
        self.head = nn.Sequential(
            nn.ReLU(), MaskedConv2d(hidden, hidden, centre_mask(groups, groups, 1, strict=False)),
            nn.ReLU(), MaskedConv2d(hidden, out, centre_mask(groups, out_groups, 1, strict=False)),
        )
        # rows above a pixel that its conditionals read: the first layer first_kernel // 2, every later one
        # kernel // 2 more (what sampling may crop without changing a conditional)
        self.rows_seen = first_kernel // 2 + (layers - 1) * (kernel // 2)

    @property
    def stage_channels(self) -> list[int]:
        return [self.hidden] * len(self.layers)

    @property
    def stage_names(self) -> list[str]:
        return [f"layer{i + 1}" for i in range(len(self.layers))]

    def forward_intermediates(self, x: torch.Tensor, stop: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The horizontal stack after the last layer run, and after every layer (the first ``stop`` only)."""
        v = h = x
        stages = []
        for layer in self.layers[:stop]:
            v, h = layer(v, h)
            stages.append(h)
        return h, stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_intermediates(x)[0])

    def row_context(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What every layer's vertical stack gives the horizontal one in the last row of ``x`` (sampling's cache).

        The last row's own pixels are not read, so it may hold anything; ``x`` needs only the
        ``rows_seen`` rows above it for the exact values.

        Shape:
            - Input: ``(B, 3, rows, W)`` -> Output: ``layers`` maps ``(B, 2 * hidden, 1, W)``
        """
        v, out = x, []
        for layer in self.layers:
            v, from_v = layer.vertical(v)
            out.append(from_v[..., -1:, :])
        return out

    def row_params(self, x: torch.Tensor, context: list[torch.Tensor]) -> torch.Tensor:
        """Mixture parameters of one row from that row's pixels and its :meth:`row_context` (columns may be cut
        at any ``c``: column ``c`` reads only columns ``<= c``).

        Shape:
            - Input: ``(B, 3, 1, w)`` and ``layers`` maps ``(B, 2 * hidden, 1, w)`` -> Output: ``(B, 9K, 1, w)``
        """
        h = x
        for layer, from_v in zip(self.layers, context, strict=True):
            h = layer.horizontal(h, from_v)
        return self.head(h)


def symmetric(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images (uint8, or floats in [0, 1]) -> their 8-bit values on [-1, 1], the network's input."""
    return to_8bit(x).to(dtype) * (2 / 255) - 1


class Symmetric(nn.Module):
    """:func:`symmetric` as the encoder's input adapter (the ``normalize`` of the spine's encoders)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return symmetric(x)


class PixelCNNEncoder(nn.Module):
    """RGB images in [0, 1] (or uint8) -> one stage of the PixelCNN, averaged over space (the exported encoder).

    Every stage is read in one pass by :meth:`forward_intermediates` (``backbone.forward_intermediates``
    after ``normalize``, the duck type of :class:`~selfsup.ssl.stage_features.StageFeatureEncoder`).

    Args:
        net: the trained network.
        layer: the 0-based stage :meth:`forward` pools.

    Shape:
        - forward: ``(B, 3, H, W)`` -> ``(B, hidden)``
        - forward_intermediates: ``(B, 3, H, W)`` -> the last stage and the list of every stage ``(B, hidden, H, W)``
    """

    def __init__(self, net: GatedPixelCNN, layer: int) -> None:
        super().__init__()
        self.backbone, self.normalize, self.layer = net, Symmetric(), layer
        self.num_features = net.hidden
        self.stage_channels, self.stage_names = net.stage_channels, net.stage_names

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.backbone.forward_intermediates(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, stages = self.backbone.forward_intermediates(self.normalize(x), stop=self.layer + 1)
        return stages[self.layer].mean(dim=(2, 3))  # (B, hidden, H, W) -> (B, hidden)

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every layer's map of one pass by name, then ``"out"`` (what :meth:`forward` gives): the stage
        interface of layer-wise evaluation (:mod:`selfsup.eval.layers`), so ``--layers all`` probes each
        layer and ``--layers best`` picks one on held-out labels (iGPT found the middle ones best)."""
        _, stages = self.forward_intermediates(x)
        return {**dict(zip(self.stage_names, stages, strict=True)), "out": stages[self.layer].mean(dim=(2, 3))}
