"""What a run's method trains on: the views its network reads, for ``selfsup plot RUN augmentations``.

The views are caught where they enter the network: every call of the method's backbone
(``forward``, ``forward_features`` or ``forward_intermediates``) during one :meth:`loss` on one
image records its input. So the picture shows what really runs, for every method, with no
per-method drawing code: rotation's four turns, jigsaw's nine shuffled and per-tile normalised
tiles, relative position's tile pairs, CPC's patch grid, colorization's lightness, a GAN's real
and generated images. Inside ``multitask`` each task's views are labelled with its name.

Network inputs are normalised (ImageNet mean and std, or per tile); each view is drawn with its own
contrast stretched to black..white, so what is shown is the input up to brightness and contrast.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selfsup.errors import ConfigError

BACKBONE_CALLS = ("forward", "forward_features", "forward_intermediates")
AUGMENT_CALLS = ("augment", "_flip")
"""Methods whose network reads the augmented image itself (flow, PixelCNN) are shown by these outputs."""


@dataclass
class ImageViews:
    """One training image as the data path gives it, and the network inputs the method made of it."""

    loaded: torch.Tensor
    """``(3, S, S)`` uint8: the data loader's view (a streamed folder's random-resized crop, or the cached image)."""
    label: int
    views: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    """``(name, (k, C, h, w) float)``: each network call's input, in call order."""


def _capture(module: nn.Module, name: str, sink: list, augmented: list):
    """Record the input of ``module``'s outermost backbone calls into ``sink`` as ``(label, tensor)``,
    and the output of its augmentation into ``augmented``."""
    backbone = getattr(module, "backbone", None)
    label, depth = [name], [0]
    undo = []

    def patch(obj, attr, wrapper):
        original = getattr(obj, attr, None)
        if callable(original):
            setattr(obj, attr, wrapper(original))  # an instance attribute: the class's method is untouched
            undo.append((obj, attr))

    def reading(original):
        def wrapped(x, *args, **kwargs):
            if depth[0] == 0 and torch.is_tensor(x) and x.dim() == 4:  # not forward's own forward_features
                sink.append((label[0], x.detach().float().cpu()))
            depth[0] += 1
            try:
                return original(x, *args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapped

    def augmenting(original):
        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            if torch.is_tensor(out) and out.dim() == 4:
                augmented.append((f"{label[0]}: augmented", out.detach().float().cpu()))
            return out
        return wrapped

    if isinstance(backbone, nn.Module):
        for attr in BACKBONE_CALLS:
            patch(backbone, attr, reading)
    for attr in AUGMENT_CALLS:
        patch(module, attr, augmenting)
    hooks = []
    tasks = getattr(module, "tasks", None)
    if isinstance(tasks, nn.ModuleDict):  # multitask: name each task's views
        for task_name, task in tasks.items():
            hooks.append(task.register_forward_pre_hook(lambda _m, _a, n=task_name: label.__setitem__(0, n)))

    @contextlib.contextmanager
    def active():
        try:
            yield
        finally:
            for obj, attr in undo:
                delattr(obj, attr)
            for h in hooks:
                h.remove()

    return active()


@contextlib.contextmanager
def _training_mode_frozen_stats(module: nn.Module):
    """Train mode (so augmentation runs) with batch-norm layers reading their running statistics.

    One image per call would make batch statistics meaningless (and a ``(1, D)`` batch norm fails);
    nothing of the module's state changes.
    """
    was = module.training
    module.train()
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        module.train(was)


def _pick(n: int, count: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=min(count, n), replace=False).tolist())


def method_views(module: nn.Module, dataset, count: int = 6, seed: int = 0, name: str = "") -> list[ImageViews]:
    """The network inputs ``module`` makes of ``count`` training images of ``dataset`` (one ``loss`` each).

    ``dataset`` yields ``(uint8 image, label)`` as the training loader does (for a streamed folder, its
    :meth:`~selfsup.data.stream.FolderStream.training_views`). Images are drawn with ``seed``; the
    method's random augmentation is seeded with it too, so the picture is reproducible.

    Raises:
        ConfigError: the dataset is empty, or the method cannot compute its loss on one image.
    """
    if len(dataset) == 0:
        raise ConfigError("the run's training data has no images to draw")
    out = []
    for i in _pick(len(dataset), count, seed):
        image, label = dataset[i]
        item = ImageViews(image, int(label))
        sink: list = []
        augmented: list = []
        torch.manual_seed(seed + i)
        with _training_mode_frozen_stats(module), _capture(module, name, sink, augmented), torch.no_grad():
            try:
                module.loss((image.unsqueeze(0), torch.as_tensor(label).view(1)))
            except Exception as err:  # noqa: BLE001 - one line: the picture cannot be drawn
                raise ConfigError(f"{name or type(module).__name__} cannot compute its loss on one image "
                                  f"to draw its views ({type(err).__name__}: {err})") from None
        views: list = []
        for label, v in sink or augmented:  # a second pass over the very same input adds nothing to see
            if not any(v.shape == w.shape and torch.equal(v, w) for _, w in views):
                views.append((label, v))
        item.views = views
        out.append(item)
    return out


def _stretch(v: torch.Tensor) -> torch.Tensor:
    """``(k, C, h, w)`` -> ``(k, 3, h, w)`` in [0, 1], each view's contrast stretched on its own."""
    if v.shape[1] not in (1, 3):
        v = v[:, :1]
    flat = v.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    v = (v - lo) / (hi - lo).clamp_min(1e-8)
    return v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v


def _mosaic(v: torch.Tensor) -> np.ndarray:
    """``k`` views as one picture: a row for up to 4, else a square-ish grid (CPC's 7x7 patches as 7x7)."""
    from torchvision.utils import make_grid

    k = v.shape[0]
    nrow = k if k <= 4 else math.ceil(math.sqrt(k))
    pad = max(1, v.shape[-1] // 16)
    return make_grid(_stretch(v), nrow=nrow, padding=pad, pad_value=1.0).permute(1, 2, 0).numpy()


def views_figure(items: list[ImageViews], classes: list[str] | None = None, title: str | None = None):
    """One row per image: the loaded view, then each network call's inputs (labelled, with their size)."""
    from selfsup.eval.viz import _figure

    rows = []
    for it in items:
        name = classes[it.label] if classes and 0 <= it.label < len(classes) else str(it.label)
        panels = [(f"loaded ({name})", it.loaded.permute(1, 2, 0).numpy())]
        for label, v in it.views:
            k, c, h, w = v.shape
            panels.append((f"{label}: {f'{k} x ' if k > 1 else ''}{c}x{h}x{w}", _mosaic(v)))
        rows.append(panels)
    cols = max(len(p) for p in rows)
    widths = [max(p[c][1].shape[1] / p[c][1].shape[0] for p in rows if c < len(p)) for c in range(cols)]
    fig = _figure(2.4 * sum(widths), 2.5 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), cols, squeeze=False, gridspec_kw={"width_ratios": widths})
    for r, panels in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(panels):
                text, img = panels[c]
                ax.imshow(img, interpolation="nearest")
                ax.set_title(text, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def run_views(run: str | Path, count: int = 6, seed: int = 0, data: str | None = None) -> tuple[list[ImageViews], list[str], str]:
    """Build a run's method from its ``config.yaml`` (weights from its newest checkpoint, when one loads)
    and draw :func:`method_views` of its training data (or ``data``). Returns the views, the class
    names and the method's name."""
    from selfsup.checkpoint import checkpoint_candidates, load_checkpoint
    from selfsup.data.datamodule import SelfSupDataModule
    from selfsup.data.stream import FolderStream
    from selfsup.errors import CheckpointError
    from selfsup.ssl.module import build_method
    from selfsup.train import resolve_config

    run = Path(run)
    cfg = resolve_config({"name": run.name, "output": str(run.parent)}, resume=True)
    data_cfg = {**cfg["data"], "num_workers": 0, "val": False, "decode": "loader"}
    if data is not None:
        data_cfg["data"] = data
    dm = SelfSupDataModule(**data_cfg, seed=seed)
    dm.setup("fit")
    model = build_method(cfg["method"], cfg["model"])
    for path in checkpoint_candidates(run / "checkpoints"):
        try:
            model.load_state_dict(load_checkpoint(path)["state_dict"])
            break
        except (CheckpointError, RuntimeError):
            continue
    dataset = dm.train_set
    if isinstance(dataset, FolderStream):  # the loader's random-resized crops of whole images, as in training
        model.crops_in_loader = True
        dataset = dataset.training_views(model.train_crop(dataset.image_size), seed)
    return method_views(model, dataset, count=count, seed=seed, name=cfg["method"]), list(dm.train_set.classes), cfg["method"]
