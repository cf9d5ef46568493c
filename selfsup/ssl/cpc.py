"""CPC v2: predict the encodings of patches lower in an image from a causal context of the patches above.

Each image is cut on the device into an overlapping grid of patches; the shared backbone encodes every
patch of the batch in one pass; a PixelCNN-style network summarises, for every grid row, the rows at
or above it; and a linear map per offset ``k`` predicts the target vector ``k`` rows below. InfoNCE
scores each prediction against every patch vector in the batch (:class:`~selfsup.ssl.losses.GridInfoNCE`).
The loss is a pretext :class:`CPCTask` (task ``cpc``, so ``multitask`` combines it with the others on one
backbone); the method :class:`CPC` wraps it and exports a patch-grid encoder.

- [0] Data-Efficient Image Recognition with Contrastive Predictive Coding (CPC v2), Hénaff et al. 2019,
  https://arxiv.org/abs/1905.09272
- [1] Representation Learning with Contrastive Predictive Coding, van den Oord et al. 2018,
  https://arxiv.org/abs/1807.03748
- [2] Unsupervised Visual Representation Learning by Context Prediction, Doersch et al. 2015,
  https://arxiv.org/abs/1505.05192 (colour dropping)
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.transforms import PatchAugment
from selfsup.errors import ConfigError
from selfsup.pretext.task import Task, TaskMethod, register_task
from selfsup.ssl.losses import GridInfoNCE
from selfsup.ssl.module import register_method
from selfsup.ssl.patch_grid import (  # noqa: F401  (re-exported: they lived here first)
    PatchEncoder,
    PatchGrid,
    default_patch_grid,
    fit_images,
    patchify,
)

DIRECTIONS = {"down": (1, 0), "up": (-1, 0), "right": (0, 1), "left": (0, -1)}
"""Prediction directions and their grid steps: ``down`` means context above predicts rows below."""


class CausalBlock(nn.Module):
    """Residual PixelCNN block: 1x1, (1, 3) conv along the row, top-padded (2, 1) conv, 1x1 (CPC v2 app. A.2).

    The (2, 1) convolution sees rows ``i - 1`` and ``i`` only (one row of zero padding on top, none
    below), so output row ``i`` depends on input rows ``<= i`` by construction, not by masking weights.

    Shape:
        - Input: ``(B, dim, Gh, Gw)`` -> Output: same shape (the residual branch, without the skip)
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1)),
            nn.ZeroPad2d((0, 0, 1, 0)),
            nn.Conv2d(hidden, hidden, (2, 1)),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def to_frame(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Flip/transpose a ``(..., G, G)`` grid so that ``direction`` points down its rows."""
    if direction == "up":
        return x.flip(-2)
    if direction == "right":
        return x.transpose(-2, -1)
    if direction == "left":
        return x.flip(-1).transpose(-2, -1)
    return x


def from_frame(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Inverse of :func:`to_frame`."""
    if direction == "up":
        return x.flip(-2)
    if direction == "right":
        return x.transpose(-2, -1)
    if direction == "left":
        return x.transpose(-2, -1).flip(-1)
    return x


class ContextNetwork(nn.Module):
    """Causal context of a patch-vector grid for each prediction direction (CPC v2's PixelCNN).

    Each direction's grid is flipped/transposed so that it points down, all directions run through
    **one shared** stack of :class:`CausalBlock` as one batch, and the result is mapped back, so the
    context at ``(i, j)`` for ``down`` summarises rows ``<= i`` (for ``up`` rows ``>= i``, for ``right``
    columns ``<= j``, for ``left`` columns ``>= j``).

    Args:
        dim: channels of the patch vectors (and of the context).
        hidden: width inside each residual block.
        blocks: number of residual blocks (0: the context is the patch vector itself).
        directions: names from :data:`DIRECTIONS`.

    Shape:
        - Input: ``(B, dim, G, G)`` -> Output: ``(R, B, dim, G, G)`` with ``R = len(directions)``
    """

    def __init__(
        self, dim: int, hidden: int = 256, blocks: int = 5, directions: tuple[str, ...] = ("down",)
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CausalBlock(dim, hidden) for _ in range(blocks))
        self.directions = directions

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b = grid.shape[0]
        x = torch.cat([to_frame(grid, d) for d in self.directions])  # R x (B, D, G, G) -> (R*B, D, G, G)
        for block in self.blocks:
            x = x + block(x)
        x = F.relu(x)
        parts = x.split(b)  # (R*B, D, G, G) -> R x (B, D, G, G)
        return torch.stack(
            [from_frame(p, d) for p, d in zip(parts, self.directions, strict=True)]
        )  # (R, B, D, G, G)


@register_task("cpc")
class CPCTask(Task):
    """CPC v2's loss on a shared backbone: patch grid, patch augmentation, context network, predictors, InfoNCE.

    Every patch of the batch goes through the backbone in one pass; the context network, the target
    projection and one ``(D, T)`` predictor per offset make the predictions, and
    :class:`~selfsup.ssl.losses.GridInfoNCE` scores them against every patch vector of the batch.
    Returns ``loss``, ``cpc_acc`` and the mean patch vector of each image as ``features``.

    Args:
        num_features: the backbone's pooled width ``D``.
        in_chans: the backbone's input channels; with 1 (lightness, when multitask has colorization) the
            patch augmentation's colour dropping has nothing to drop and only flips.
        image_size: resize (shorter side) and centre-crop every batch to this side first
            (:func:`fit_images`), as :class:`CPC` does; ``None`` (multitask's default) cuts the grid
            from the images as given, with the geometry of their size (:meth:`PatchGrid.for_image`;
            32 px: 8 px patches at stride 4); they must be square and at least a patch wide.
        Other arguments: see :class:`CPC`.
    """

    whole_image_features: ClassVar[bool] = False
    batch_norm_ok: ClassVar[bool] = False

    def __init__(
        self,
        num_features: int,
        in_chans: int = 3,
        *,
        image_size: int | None = None,
        patch_size: int | None = None,
        patch_stride: int | None = None,
        max_offset: int = 5,
        skip_overlap: bool = True,
        directions: str = "down",
        context_hidden: int = 256,
        context_blocks: int = 5,
        target_dim: int | None = 64,
        emb_scale: float = 0.1,
        patch_color_drop: float = 1.0,
        patch_flip: float = 0.5,
        chunk_size: int | None = 4096,
        gather_negatives: bool = False,
    ) -> None:
        super().__init__()
        if image_size is not None and image_size < 1:
            raise ConfigError(f"image_size must be positive or None, got {image_size!r}")
        for name, v in (("patch_size", patch_size), ("patch_stride", patch_stride), ("max_offset", max_offset)):
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be positive, got {v!r}")
        dirs = tuple(d.strip() for d in directions.split(","))
        if not dirs or any(d not in DIRECTIONS for d in dirs) or len(set(dirs)) != len(dirs):
            raise ConfigError(
                f"directions must be distinct names from {sorted(DIRECTIONS)}, got {directions!r}"
            )
        for name, v in (
            ("context_hidden", context_hidden),
            ("target_dim", target_dim),
            ("chunk_size", chunk_size),
        ):
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be positive, got {v!r}")
        if context_blocks < 0 or emb_scale <= 0:
            raise ConfigError(
                f"need context_blocks >= 0 and emb_scale > 0, got {context_blocks!r}, {emb_scale!r}"
            )
        self.image_size, self.emb_scale = image_size, emb_scale
        self._grid_options = (patch_size, patch_stride, max_offset, skip_overlap)
        # One predictor per offset: a fixed image size fixes the offsets; otherwise 1..max_offset, of which
        # each image size uses its own (the rows of the others get no gradient from it).
        self.predictor_offsets = (
            tuple(range(1, max_offset + 1)) if image_size is None else self.grid_for(image_size).offsets
        )
        d = num_features
        t = d if target_dim is None else target_dim
        self.patch_augment = PatchAugment(patch_color_drop, patch_flip)
        self.context = ContextNetwork(d, context_hidden, context_blocks, dirs)
        self.target_proj = nn.Identity() if target_dim is None else nn.Linear(d, t)
        # One (D, T) map per offset, applied to all offsets as one einsum.
        self.predictors = nn.Parameter(torch.randn(len(self.predictor_offsets), d, t) / d**0.5)  # (K, D, T)
        self._loss_args = ([DIRECTIONS[x] for x in dirs], chunk_size, gather_negatives)
        self._criteria: dict[tuple[int, ...], GridInfoNCE] = {}  # by offsets; parameter-free

    def grid_for(self, image_size: int) -> PatchGrid:
        """The patch geometry of ``image_size`` px images with this task's options."""
        return PatchGrid.for_image(image_size, *self._grid_options)

    def criterion(self, offsets: tuple[int, ...]) -> GridInfoNCE:
        """The InfoNCE loss over the predictions of ``offsets`` (built once per offset set)."""
        if offsets not in self._criteria:
            self._criteria[offsets] = GridInfoNCE(offsets, *self._loss_args)
        return self._criteria[offsets]

    def predict(
        self, z: torch.Tensor, offsets: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and targets from the patch-vector grid, for ``offsets`` (``None``: every predictor's).

        Shape:
            - Input: ``(B, G, G, D)``
            - Output: predictions ``(R, K, B, G, G, T)`` and targets ``(B, G, G, T)``
        """
        weights = self.predictors  # (K_all, D, T)
        if offsets is not None and offsets != self.predictor_offsets:
            rows = torch.tensor([self.predictor_offsets.index(k) for k in offsets], device=z.device)
            weights = weights[rows]  # (K_all, D, T) -> (K, D, T)
        ctx = self.context(z.permute(0, 3, 1, 2))  # (B, G, G, D) -> (B, D, G, G) -> (R, B, D, G, G)
        preds = torch.einsum("rbdij,kdt->rkbijt", ctx, weights) * self.emb_scale  # (R, K, B, G, G, T)
        return preds, self.target_proj(z)  # targets (B, G, G, T)

    def forward(self, x, backbone, prepare):
        if self.image_size is not None:
            x = fit_images(x, self.image_size)  # (B, 3, S, S) in [0, 1]
        if x.shape[-1] != x.shape[-2]:
            raise ConfigError(f"cpc needs square images (or an image_size), got {tuple(x.shape[-2:])}")
        geo = self.grid_for(int(x.shape[-1]))
        grid = patchify(prepare(x), geo.patch, geo.stride)  # (B, G, G, C, p, p)
        b, g = grid.shape[:2]
        patches = grid.reshape(b * g * g, *grid.shape[3:])  # (B, G, G, C, p, p) -> (B*P, C, p, p)
        if self.training:
            patches = self.patch_augment(patches)
        z = backbone(patches).view(b, g, g, -1)  # (B*P, D) -> (B, G, G, D)
        preds, targets = self.predict(z, geo.offsets)
        loss, acc = self.criterion(geo.offsets)(preds, targets)
        return {"loss": loss, "cpc_acc": acc, "features": z.detach().mean(dim=(1, 2))}  # (B, D)


@register_method("cpc")
class CPC(TaskMethod):
    """CPC v2 (Hénaff et al. 2019): contrastive prediction of patch encodings down an image.

    The loss is :class:`CPCTask`'s (which ``multitask --tasks ...,cpc`` reuses) on batches fitted to
    ``image_size``; the exported encoder (:class:`PatchEncoder`) mean-pools the patch vectors of that grid.
    Defaults follow the paper's pseudo-code (appendix A.2) where it is explicit: layer norm in the
    encoder, 5 residual PixelCNN blocks of width 256, targets projected to 64 dims, predictions scaled by
    0.1. For 32 px images the grid is Bolts' CIFAR grid (8 px patches at stride 4, 7x7); the optimiser
    is Adam(W) at 2e-4 without weight decay, as Adam is what the paper's and Bolts' training use.
    Offsets whose target patches overlap the context row are skipped by default (the paper's code
    skips them too), so a 32 px image predicts offsets 2..5 on its 7x7 grid.

    The base arguments' defaults differ from :class:`~selfsup.ssl.module.SSLModule`'s (layer norm,
    AdamW at 2e-4, no weight decay); ``crop_scale``/``flip`` act on whole images. Lightning checkpoints
    written before the loss moved into :class:`CPCTask` (its parameters now live under ``task.``) do not
    resume; their exports still load.

    Args:
        image_size: side of the square images the grid is cut from; training batches and evaluation
            images of another size are resized and centre-cropped to it first.
        patch_size: patch side in pixels; ``None`` picks :func:`default_patch_grid` (32 px: 8).
        patch_stride: step between patches in pixels; ``None`` picks :func:`default_patch_grid` (32 px: 4,
            so a 7x7 grid of half-overlapping patches).
        max_offset: predict offsets ``1..max_offset`` rows ahead (``K`` linear maps).
        skip_overlap: skip offsets ``k`` whose target patches overlap the context row
            (``k * patch_stride < patch_size``).
        directions: comma-separated prediction directions, from ``down`` (top to bottom), ``up``,
            ``left``, ``right``; they share the encoder, the context network and the predictors.
            ``down`` alone is the default: in the CPU results table all four (as the paper) gave 44.2
            linear against 44.8 for ``down``, and took longer to train
            (``benchmarks/results/quality_cpu_cpc_directions.json``).
        context_hidden: width inside the context network's residual blocks.
        context_blocks: number of residual blocks in the context network.
        target_dim: targets are a linear projection of the patch vectors to this many dims (as in the
            paper's code); ``None`` uses the patch vectors themselves.
        emb_scale: scale of the predictions (the paper's ``emb_scale``).
        patch_color_drop: probability that a patch gets two colour channels dropped (training only).
        patch_flip: probability that a patch is flipped horizontally (training only).
        chunk_size: prediction rows per logits chunk (memory bound); ``None`` for one matmul.
        gather_negatives: under DDP, all ranks' target vectors are candidates.
    """

    base_defaults = {"norm": "layer", "optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0}
    task: CPCTask

    def __init__(
        self,
        *,
        image_size: int = 32,
        patch_size: int | None = None,
        patch_stride: int | None = None,
        max_offset: int = 5,
        skip_overlap: bool = True,
        directions: str = "down",
        context_hidden: int = 256,
        context_blocks: int = 5,
        target_dim: int | None = 64,
        emb_scale: float = 0.1,
        patch_color_drop: float = 1.0,
        patch_flip: float = 0.5,
        chunk_size: int | None = 4096,
        gather_negatives: bool = False,
        **base,
    ) -> None:
        super().__init__(**(self.base_defaults | base))
        if image_size is None or image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size!r}")
        self.task = CPCTask(
            self.num_features, self.backbone.in_chans, image_size=image_size, patch_size=patch_size,
            patch_stride=patch_stride, max_offset=max_offset, skip_overlap=skip_overlap, directions=directions,
            context_hidden=context_hidden, context_blocks=context_blocks, target_dim=target_dim,
            emb_scale=emb_scale, patch_color_drop=patch_color_drop, patch_flip=patch_flip,
            chunk_size=chunk_size, gather_negatives=gather_negatives,
        )

    @property
    def geometry(self) -> PatchGrid:
        """The training grid: patch, stride, patches per side and predicted offsets at ``image_size``."""
        return self.task.grid_for(self.hparams.image_size)

    def encoder(self) -> PatchEncoder:
        """Patchify at the training size, encode every patch, mean-pool the grid -> ``(B, D)``."""
        geo = self.geometry
        return PatchEncoder(self.backbone, self.normalize, geo.image_size, geo.patch, geo.stride)
