"""Exemplar: every image is its own surrogate class, seen through strong augmentation.

Dosovitskiy et al. make many heavily augmented copies of each training image (crops that scale and
translate it, rotations, colour and contrast changes) and train a softmax over the images: one class per
image. The last layer then grows with the data set (1.28M classes on ImageNet), so Doersch & Zisserman
(section 3) run Exemplar at ImageNet scale with a triplet loss instead of the softmax: two augmentations
of one image must be closer to each other than to the augmentations of other images. Kolesnikov et al.
2019 re-ran it that way, with public code (``google/revisiting-self-supervised``, ``exemplar.py`` and
``config/exemplar/imagenet.sh``: 8 augmented copies of each image, an L2-normalised linear embedding of
the backbone's features, FaceNet's semi-hard triplet loss with margin 0.5 on squared distances, negatives
the other images of the batch). This module implements that scalable form:

- **Views**: ``copies`` augmentations of every image, made batched on the device with per-view random
  parameters (:func:`exemplar_augment`: random resized crop for scale and translation, rotation, flip,
  colour jitter of brightness, contrast, saturation and hue).
- **Embedding**: a linear map of the pooled backbone features, L2-normalised.
- **Loss** (:func:`triplet_loss`): for every ordered pair (anchor, positive) of views of one image, the
  hinge ``max(0, d(a, p) - d(a, n) + margin)`` on squared Euclidean distances, where the negative ``n`` is
  chosen among the views of *every other image of the batch* (never a view of the anchor's own image):
  ``semihard`` (default, FaceNet and the reference code): the closest negative farther than the
  positive, or the farthest negative when none is; ``all``: the mean over every negative.
- **Batch norm**: all views of all images go through the backbone in one pass, so every view is
  normalised with the same batch statistics, and the triplets are formed inside that same batch. The
  statistics are therefore identical for positives and negatives and cannot tell which views belong
  together (the leak MoCo's shuffled BN fixes arises when positives and negatives are normalised in
  different sub-batches). Under DDP each rank therefore forms its triplets from its own batch by default;
  ``gather_negatives`` takes every rank's views as candidates (the single-process loss of the global
  batch), which is only sound on a backbone without per-rank batch statistics (``--norm layer`` or
  ``group``): with batch norm, views from another rank would be told apart by their statistics.

Not implemented: the paper's parametric softmax over surrogate classes, which needs every image's index
in the data set, and the data loaders yield ``(image, label)`` only.

- [0] Discriminative Unsupervised Feature Learning with Exemplar Convolutional Neural Networks,
  Dosovitskiy et al. 2014, https://arxiv.org/abs/1406.6909
- [1] Multi-task Self-Supervised Visual Learning, Doersch & Zisserman 2017, https://arxiv.org/abs/1708.07860
- [2] Revisiting Self-Supervised Visual Representation Learning, Kolesnikov et al. 2019,
  https://arxiv.org/abs/1901.09005
- [3] FaceNet, Schroff et al. 2015, https://arxiv.org/abs/1503.03832 (semi-hard negatives)
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.transforms import make_augment
from selfsup.errors import ConfigError
from selfsup.pretext.task import Task, TaskMethod, register_task
from selfsup.ssl.losses import all_gather_with_grad
from selfsup.ssl.module import register_method

MINING = ("semihard", "all")


def exemplar_augment(image_size: int, crop_min: float = 0.3, rotation: float = 20.0, color_jitter: float = 0.4,
                     grayscale: float = 0.0) -> nn.Module:
    """The strong augmentation of Exemplar, batched with per-image random parameters (kornia).

    Rotation by up to ``rotation`` degrees (reflection padding, so no black corners), then a random resized
    crop keeping ``crop_min`` to all of the area (scale and translation), a horizontal flip, colour jitter of
    strength ``color_jitter`` (brightness, contrast and saturation by up to it, hue by a quarter of it: 0.4
    gives Dosovitskiy et al.'s hue shift of +-0.1) and grayscale with probability ``grayscale``.

    Shape:
        - Input: ``(N, C, H, W)`` float in [0, 1] -> Output: ``(N, C, image_size, image_size)``
    """
    if not 0.0 < crop_min <= 1.0:
        raise ConfigError(f"crop_min must be in (0, 1], got {crop_min!r}")
    if not 0.0 <= rotation <= 180.0:
        raise ConfigError(f"rotation must be in [0, 180] degrees, got {rotation!r}")
    ops: list[nn.Module] = [K.RandomAffine(degrees=rotation, padding_mode="reflection")] if rotation > 0 else []
    ops.append(make_augment(image_size, crop_scale=(crop_min, 1.0), flip=True, color_jitter=color_jitter,
                            grayscale_p=grayscale))
    return nn.Sequential(*ops)


def triplet_loss(z: torch.Tensor, ids: torch.Tensor, margin: float = 0.5, mining: str = "semihard",
                 candidates: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triplet loss over every (anchor, positive) pair of a batch, negatives from the other ids, and retrieval accuracy.

    Rows with the same ``id`` are views of one image. For each ordered pair ``(a, p)``, ``a != p``, of one id
    the hinge ``max(0, d_ap - d_an + margin)`` on squared distances, with ``n`` among the rows of other ids:
    ``semihard``: the smallest ``d_an > d_ap`` (the largest ``d_an`` if there is none; Schroff et al. 2015,
    as TensorFlow's ``triplet_semihard_loss``), averaged over pairs; ``all``: averaged over every
    ``(a, p, n)``. Vectorised by sorting each anchor's negative distances once: ``O(N^2 log N)``, not ``N^3``.

    Args:
        candidates: the rows positives and negatives are drawn from, when not ``z`` itself: ``(zc (M, D),
            idsc (M,), start)`` with ``z == zc[start:start + N]`` (every rank's views gathered under DDP).

    Returns:
        The loss and the share of rows whose nearest other row has the same id (detached).

    Shape:
        - Input: ``z`` ``(N, D)``, ``ids`` ``(N,)`` with every id at least twice and at least two ids.
    """
    if mining not in MINING:
        raise ConfigError(f"mining must be one of {MINING}, got {mining!r}")
    n = z.shape[0]
    zc, idsc, start = (z, ids, 0) if candidates is None else candidates
    m = zc.shape[0]
    # squared distances from each row to each candidate; exactly 0 to itself: (N, M)
    d = ((z * z).sum(1)[:, None] + (zc * zc).sum(1)[None, :] - 2 * z @ zc.T).clamp_min(0)
    eye = torch.arange(m, device=z.device)[None, :] == torch.arange(start, start + n, device=z.device)[:, None]
    d = d.masked_fill(eye, 0.0)
    same = ids[:, None] == idsc[None, :]  # (N, M)
    pos, neg = same & ~eye, ~same
    n_neg = neg.sum(1, keepdim=True)  # (N, 1) negatives per anchor
    # each anchor's negative distances ascending, non-negatives last: (N, M)
    neg_sorted = d.masked_fill(~neg, float("inf")).sort(1).values
    if mining == "semihard":
        first_above = torch.searchsorted(neg_sorted.detach().contiguous(), d.detach().contiguous(), right=True)
        choose = torch.where(first_above < n_neg, first_above, n_neg - 1)  # (N, M): none farther -> the farthest
        d_neg = neg_sorted.gather(1, choose)  # (N, M): the negative for pair (a, p)
        loss = F.relu(d - d_neg + margin)[pos].mean()
    else:
        # sum_n relu(d_ap + m - d_an) = k (d_ap + m) - (sum of the k smallest d_an), k = #{n: d_an < d_ap + m}
        k = torch.searchsorted(neg_sorted.detach().contiguous(), (d + margin).detach().contiguous())  # (N, M)
        prefix = F.pad(neg_sorted.masked_fill(~torch.isfinite(neg_sorted), 0).cumsum(1), (1, 0))  # (N, M+1)
        per_pair = k * (d + margin) - prefix.gather(1, k)  # (N, M)
        loss = per_pair[pos].sum() / n_neg.expand(-1, m)[pos].sum()
    nearest = d.masked_fill(eye, float("inf")).argmin(1)  # (N,): index into the candidates
    acc = same[torch.arange(n, device=z.device), nearest].float().mean()
    return loss, acc


@register_task("exemplar")
class ExemplarTask(Task):
    """``copies`` strong augmentations of each image through the backbone, a triplet loss on their embeddings.

    Args: see :class:`Exemplar`.
    """

    def __init__(self, num_features: int, in_chans: int = 3, *, copies: int = 2, embed_dim: int = 1000,
                 margin: float = 0.5, mining: str = "semihard", crop_min: float = 0.3, rotation: float = 20.0,
                 color_jitter: float = 0.4, grayscale: float = 0.0, gather_negatives: bool = False) -> None:
        super().__init__()
        if copies < 2:
            raise ConfigError(f"copies must be >= 2 (a positive needs two views of an image), got {copies!r}")
        if embed_dim < 1:
            raise ConfigError(f"embed_dim must be >= 1, got {embed_dim!r}")
        if margin <= 0:
            raise ConfigError(f"margin must be positive, got {margin!r}")
        if mining not in MINING:
            raise ConfigError(f"mining must be one of {MINING}, got {mining!r}")
        if color_jitter < 0:
            raise ConfigError(f"color_jitter must be >= 0, got {color_jitter!r}")
        if not 0.0 <= grayscale <= 1.0:
            raise ConfigError(f"grayscale must be a probability in [0, 1], got {grayscale!r}")
        exemplar_augment(8, crop_min, rotation)  # validates crop_min and rotation now, not at the first step
        self.copies, self.margin, self.mining, self.gather_negatives = copies, margin, mining, gather_negatives
        self.aug_args = {"crop_min": crop_min, "rotation": rotation, "color_jitter": color_jitter,
                         "grayscale": grayscale}
        self._augmenters: dict[int, nn.Module] = {}  # parameter-free, by image size; not submodules
        self.embed = nn.Linear(num_features, embed_dim)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``copies`` augmentations of every image and their image ids: view ``k`` of image ``i`` at row ``k * B + i``.

        Shape:
            - Input: ``(B, 3, H, W)`` in [0, 1] -> Output: ``(copies * B, 3, H, H)`` and ``(copies * B,)`` int64
        """
        b, size = x.shape[0], x.shape[-1]
        if b < 2:
            raise ConfigError(f"exemplar needs at least 2 images in a batch (negatives are other images), got {b}")
        if size not in self._augmenters:
            self._augmenters[size] = exemplar_augment(size, **self.aug_args)
        many = x.repeat(self.copies, 1, 1, 1)  # (C*B, 3, H, W)
        ids = torch.arange(b, device=x.device).repeat(self.copies)  # (C*B,)
        return self._augmenters[size](many) if self.training else many, ids

    def forward(self, x, backbone, prepare):
        views, ids = self.views(x)
        z = F.normalize(self.embed(backbone(prepare(views))), dim=1)  # (C*B, E), one pass: shared BN statistics
        candidates = None
        if self.gather_negatives:
            zc, start = all_gather_with_grad(z)  # (world*C*B, E); rank r's views from row r*C*B
            per, b = z.shape[0], x.shape[0]
            rows = torch.arange(zc.shape[0], device=z.device)
            ids = ids + start // per * b  # global image ids: rank r's image i is r*B + i
            candidates = (zc, rows // per * b + rows % per % b, start)
        loss, acc = triplet_loss(z, ids, self.margin, self.mining, candidates)
        return {"loss": loss, "exemplar_acc": acc}


@register_method("exemplar")
class Exemplar(TaskMethod):
    """Exemplar as Doersch & Zisserman ran it at ImageNet scale: augmented views, a triplet loss over the batch.

    Each image of a batch is augmented ``copies`` times (the only augmentation: the shared crop is off,
    ``crop_scale=1``); the views go through the backbone in one pass, a linear embedding, L2 normalisation
    and a triplet loss whose negatives are the views of the batch's other images. Logs ``train/exemplar_acc``:
    how often a view's nearest neighbour in the batch is a view of the same image.

    Args:
        copies: augmented views per image (Kolesnikov et al.'s reference: 8); each costs a backbone pass.
        embed_dim: width of the linear embedding the loss sees (the reference's 1000).
        margin: triplet margin on squared distances of unit vectors (range 0 to 4; the reference's 0.5).
        mining: ``semihard`` (the closest negative farther than the positive; FaceNet, the reference) or
            ``all`` (the mean over every negative).
        crop_min: smallest area fraction of a view's random resized crop (scale and translation).
        rotation: largest rotation of a view in degrees (Dosovitskiy et al.: 20).
        color_jitter: strength of a view's colour jitter (brightness, contrast, saturation; hue a quarter).
        grayscale: probability that a view is grey (the reference: 0.66 on ImageNet).
        gather_negatives: under DDP, every rank's views are candidates (positives and negatives of the global
            batch); only with ``--norm layer`` or ``group`` (see the module's note on batch norm).
    """

    base_defaults = {"crop_scale": 1.0}

    def __init__(self, *, copies: int = 2, embed_dim: int = 1000, margin: float = 0.5, mining: str = "semihard",
                 crop_min: float = 0.3, rotation: float = 20.0, color_jitter: float = 0.4, grayscale: float = 0.0,
                 gather_negatives: bool = False, **base) -> None:
        super().__init__(**(self.base_defaults | base))
        self.task = ExemplarTask(self.num_features, self.backbone.in_chans, copies=copies, embed_dim=embed_dim,
                                 margin=margin, mining=mining, crop_min=crop_min, rotation=rotation,
                                 color_jitter=color_jitter, grayscale=grayscale, gather_negatives=gather_negatives)
