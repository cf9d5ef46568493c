"""SSLModule: the LightningModule base every method builds on, its registry, and export.

The evaluation encoders and :func:`load_encoder` live in :mod:`selfsup.ssl.encoders` (no Lightning) and are
re-exported here. Importing this module imports every built-in method (last, below), so :data:`METHODS` is
complete however it was reached.

A method subclasses :class:`SSLModule` and implements one hook, :meth:`SSLModule.loss`, returning a
dict with a scalar ``loss`` (and anything else worth logging). The base owns the backbone, the
optimiser (SGD, AdamW or LARS) with linear warm-up and cosine decay, hyper-parameter saving,
``encode`` and ``export``. Methods that need several optimisers (BiGAN) set
``automatic_optimization = False`` and override ``training_step`` / ``configure_optimizers``, using
:meth:`SSLModule.build_optimizer` for each parameter group.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from safetensors.torch import save_file
from torch import nn

from selfsup.checkpoint import atomic_save, atomic_write_text, safe_torch_load
from selfsup.data.geometry import TrainCrop
from selfsup.data.transforms import make_augment, to_float
from selfsup.errors import CheckpointError, ConfigError
from selfsup.ssl.backbone import Backbone
from selfsup.ssl.encoders import (  # noqa: F401  (re-exported: they lived here first)
    EXPORT_FORMAT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageEncoder,
    Lightness,
    Normalize,
    build_encoder,
    load_encoder,
)

METHODS: dict[str, type[SSLModule]] = {}
"""Registered methods by name; the CLI and :func:`load_encoder` read it."""

OPTIMIZERS = ("sgd", "adamw", "lars")


def register_method(name: str):
    """Class decorator registering an :class:`SSLModule` subclass in :data:`METHODS` under ``name``."""

    def deco(cls: type[SSLModule]) -> type[SSLModule]:
        METHODS[name] = cls
        cls.method_name = name
        return cls

    return deco


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up from ~0 to 1, then cosine decay to ``final_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class SSLModule(pl.LightningModule):
    """Base of every self-supervised method.

    Args:
        backbone: convnet_small (fast, for CPU tests), cifar_resnet18 (3x3 stem, no max-pool) or any timm
            model name, built with pretrained=False (python -c "import timm; print(timm.list_models('resnet*'))"
            lists them).
        norm: backbone normalisation layer (``batch``, ``group``, ``layer``) or ``None`` for its own.
        optimizer: ``sgd``, ``adamw`` or ``lars``.
        lr: peak learning rate (reached after warm-up).
        weight_decay: decoupled (AdamW) or L2 (SGD/LARS) weight decay.
        momentum: SGD/LARS momentum.
        warmup_epochs: epochs of linear warm-up (fractions allowed).
        crop_scale: smallest area fraction of the random resized crop (1.0 disables cropping).
        flip: random horizontal flips in the training augmentation.
        channels_last: train with weights and images in channels-last memory format (faster
            convolutions on tensor-core GPUs with bf16-mixed or 16-mixed precision; no effect on results).
        in_chans: backbone input channels, set by a method, never the user: 1 feeds the backbone CIE
            lightness (colorization), converted from RGB by the encoder itself.

    A method declares only its own arguments, keyword-only, and forwards the rest explicitly, so a
    misspelt option still fails here (never a ``**kwargs`` sink that swallows it)::

        class Rotation(SSLModule):
            base_defaults = {}  # optional: this method's defaults for the arguments above
            def __init__(self, *, head_hidden: int = 0, **base) -> None:
                super().__init__(**(self.base_defaults | base))

    :func:`method_arguments` reads the whole chain for ``--help`` and ``config.yaml``.
    """

    method_name: str = ""
    base_defaults: ClassVar[dict[str, Any]] = {}
    """A method's own defaults for base arguments (CPC: layer norm, AdamW at 2e-4); ``--help`` shows them."""
    uses_backbone: ClassVar[bool] = True
    """False for a method with no trunk of its own choice (a flow): tools then leave ``backbone`` alone."""
    optimizer_steps_per_batch: ClassVar[int] = 1
    """Optimiser steps per training batch (2 for a GAN's two players): Lightning's ``global_step`` and
    ``--max-steps`` count optimiser steps, so a budget in batches or images multiplies by this."""
    validates: ClassVar[bool] = False
    """Whether the method's own ``validation_step`` logs something (a VAE's ``val/bits_per_dim``), so the
    driver runs the val loop even without the online probe."""

    def __init__(
        self,
        *,
        backbone: str = "cifar_resnet18",
        norm: str | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 1.0,
        crop_scale: float = 0.5,
        flip: bool = True,
        channels_last: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if lr <= 0:
            raise ConfigError(f"lr must be positive, got {lr!r}")
        if not 0 < crop_scale <= 1:
            raise ConfigError(f"crop_scale must be in (0, 1], got {crop_scale!r}")
        if in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 3 (RGB) or 1 (lightness), got {in_chans!r}")
        # Records every argument of the whole class chain (Lightning reads each __init__ frame,
        # a subclass's ``**base`` included), so ``type(m)(**m.hparams)`` rebuilds the model.
        self.save_hyperparameters(ignore=["in_chans"])  # set by the method, not the user
        self.backbone = Backbone(backbone, in_chans=in_chans, norm=norm)
        # The input adapter: every encoder takes RGB in [0, 1]; 1-channel backbones see CIE lightness.
        self.normalize = Normalize() if in_chans == 3 else Lightness()
        self._augmenters: dict[tuple[int, bool], nn.Module] = {}  # parameter-free, so not submodules
        self.crops_in_loader = False
        """True when the data loader already made random-resized crops (streamed folders): augment only flips."""

    # -- the one hook a method implements -------------------------------------------------------
    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Compute the method's loss on a batch of ``(uint8 images (B, 3, H, W), labels (B,))``.

        Returns a dict with a scalar ``loss``; every other scalar is logged as ``train/<key>``.
        An optional ``features`` entry ``(B, D)`` (detached pooled features of the batch's images,
        in batch order) lets the online probe reuse them instead of encoding the batch again.
        """
        raise NotImplementedError

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images -> float in [0, 1], randomly cropped and flipped per image in training.

        Runs batched on the images' device (the GPU when there is one), never in data workers.
        """
        x = to_float(x)
        crop = self.hparams.crop_scale < 1 and not self.crops_in_loader
        if self.training and (crop or self.hparams.flip):
            key = (x.shape[-1], crop)
            if key not in self._augmenters:
                self._augmenters[key] = make_augment(
                    x.shape[-1], crop_scale=(self.hparams.crop_scale, 1.0) if crop else None, flip=self.hparams.flip
                )
            x = self._augmenters[key](x)
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def train_crop(self, size: int) -> TrainCrop:
        """The random-resized crop a data loader makes of whole images for this method (``crop_scale``)."""
        return TrainCrop.for_method(size, self.hparams.crop_scale)

    # -- shared Lightning plumbing ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_METHOD_KEY] = self.method_name

    def on_fit_start(self) -> None:
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)

    def training_step(self, batch, batch_idx: int):
        out = self.loss(batch)
        logs = {f"train/{k}": v.detach() for k, v in out.items() if k != "features" and v.ndim == 0}
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=batch[0].shape[0])
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=batch[0].shape[0])
        return out

    def validation_step(self, batch, batch_idx: int):
        # Validation is the online probe's business (a Callback); the module itself has nothing to do.
        return None

    def encoder(self) -> nn.Module:
        """The module that maps RGB images in [0, 1] to evaluation features ``(B, D)``."""
        return ImageEncoder(self.backbone, self.normalize)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation features of RGB images ``(B, 3, H, W)`` in [0, 1] or uint8 -> ``(B, D)``."""
        return self.encoder()(x)

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    # -- optimisation ----------------------------------------------------------------------------
    def build_optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        """The configured optimiser over ``params``; weight decay is skipped on biases and norm weights."""
        lr = self.hparams.lr if lr is None else lr
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        name = self.hparams.optimizer
        if name == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=self.hparams.momentum)
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=lr)
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=self.hparams.momentum)

    def lr_lambda(self):
        """Per-step LR multiplier for the configured warm-up + cosine schedule.

        The cosine ends at the run's last optimiser step (``--max-steps``, or the epochs' steps, whichever
        comes first); ``warmup_epochs`` counts real epochs of the training data. A run bounded by
        ``--max-time`` only (``--max-epochs -1 --max-steps -1``) has no known length: the LR warms up, then
        stays at its peak.
        """
        t = self.trainer
        total = t.estimated_stepping_batches
        if t.train_dataloader is None:  # Lightning skips loading it when max_epochs is -1
            t.fit_loop.setup_data()
        batches = t.num_training_batches
        if math.isfinite(batches) and batches > 0:
            steps_per_epoch = math.ceil(batches / max(1, t.accumulate_grad_batches))
            if t.max_steps > 0 and total == t.max_steps:  # max_steps counts every optimiser step (a GAN's two)
                steps_per_epoch *= self.optimizer_steps_per_batch
        else:  # data of unknown length: the old estimate from the epochs
            steps_per_epoch = total / t.max_epochs if t.max_epochs and t.max_epochs > 0 and math.isfinite(total) else 1
        warmup = int(self.hparams.warmup_epochs * steps_per_epoch)
        if not math.isfinite(total) or total <= 0:
            return lambda step: (step + 1) / warmup if step < warmup else 1.0
        total = max(1, int(total))
        warmup = min(warmup, total // 2)
        return lambda step: warmup_cosine(step, warmup, total)

    def configure_optimizers(self):
        opt = self.build_optimizer(self.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- export ----------------------------------------------------------------------------------
    def export(self, directory: str | Path, data: dict | None = None) -> Path:
        """Write ``encoder.safetensors`` + ``config.json`` into ``directory``; :func:`load_encoder` reads them.

        ``data`` (the training data spec and image size) is recorded so evaluation can default to it.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        enc = self.encoder()
        state = {k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
        # Each file atomically (temp + fsync + rename); config.json last, so a complete config.json means
        # its weights are complete too.
        atomic_save(lambda tmp: save_file(state, tmp), directory / "encoder.safetensors")
        config = {
            "format": EXPORT_FORMAT,
            "method": self.method_name,
            "hparams": _jsonable(dict(self.hparams)),
            "num_features": int(enc.num_features),
            "data": data,
        }
        atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")
        return directory


CHECKPOINT_METHOD_KEY = "selfsup_method"
"""Where a checkpoint names its method, so :func:`load_encoder` can rebuild it from the file alone."""

INTERNAL_ARGUMENTS = frozenset({"in_chans"})
"""Base arguments a method sets itself; never options of the user."""


def method_arguments(cls: type[SSLModule]) -> dict[str, inspect.Parameter]:
    """Every constructor argument of a method's class chain, base first, with the method's defaults.

    Walks ``cls.__mro__`` from ``cls`` down while each ``__init__`` forwards ``**base``; the base's
    defaults are replaced by ``cls.base_defaults``.
    """
    chain: list[dict[str, inspect.Parameter]] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        chain.append({
            k: p for k, p in params.items()
            if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in INTERNAL_ARGUMENTS
        })
        if klass is SSLModule or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    out: dict[str, inspect.Parameter] = {}
    for params in reversed(chain):
        out.update(params)
    for k, v in cls.base_defaults.items():
        if k not in out:
            raise ConfigError(f"{cls.__name__}.base_defaults names {k!r}, which is no argument of SSLModule")
        out[k] = out[k].replace(default=v)
    return out


def build_method(name: str, hparams: dict[str, Any], where: str = "model") -> SSLModule:
    """``METHODS[name](**hparams)``, an unknown or misspelt argument named in one line (``ConfigError``).

    ``name`` and ``hparams`` may come from a file (an export's ``config.json``): their types are checked too.
    """
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"{where}: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    if not isinstance(hparams, dict) or not all(isinstance(k, str) for k in hparams):
        raise ConfigError(f"{where}: hparams must be a mapping of {name}'s argument names to values, got {hparams!r}")
    known = method_arguments(METHODS[name])
    for k in hparams:
        if k not in known:
            import difflib

            close = difflib.get_close_matches(k, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {name} has no argument {k!r}{hint}; known: {', '.join(known)}")
    from selfsup.config import check_value

    # Every value against its annotation: a wrong type is one line here, not a traceback from inside.
    hparams = {k: check_value(v, known[k].annotation, f"{where}.{k}") for k, v in hparams.items()}
    return METHODS[name](**hparams)


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _encoder_from_checkpoint(path: Path, map_location) -> nn.Module:
    """The encoder of a Lightning checkpoint of an :class:`SSLModule`, read without unpickling code."""
    import yaml

    ckpt = safe_torch_load(path)
    not_ours = f"{path}: not a selfsup checkpoint"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) \
            or not isinstance(ckpt.get("hyper_parameters"), dict):
        raise CheckpointError(f"{not_ours} (no state_dict and hyper_parameters of a Lightning module)")
    odd = next(((k, v) for k, v in ckpt["state_dict"].items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"{not_ours}: its state_dict entry {odd[0]!r} is a {type(odd[1]).__name__}, "
                              "not a tensor")
    run_cfg_path = path.parent.parent / "config.yaml"
    run_cfg = yaml.safe_load(run_cfg_path.read_text()) if run_cfg_path.is_file() else {}
    if not isinstance(run_cfg, dict):
        run_cfg = {}
    method = ckpt.get(CHECKPOINT_METHOD_KEY) or run_cfg.get("method")
    if not method:
        raise CheckpointError(f"{not_ours}: it does not name its method, and no config.yaml of a run is beside it")
    if not isinstance(method, str):
        raise CheckpointError(f"{not_ours}: its method name is a {type(method).__name__}, not a string")
    hparams = dict(ckpt["hyper_parameters"])
    model = build_method(method, hparams, where=str(path))
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as err:  # shapes that differ from the model's
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not match the {method} model "
                              f"({first[-1].strip() if first else err})") from None
    if missing:
        raise CheckpointError(f"{path}: weights do not match the {method} model ({len(missing)} missing, e.g. {missing[0]})")
    enc = model.encoder()
    data = run_cfg.get("data", {}).get("data") if isinstance(run_cfg.get("data"), dict) else None
    enc.config = {"format": EXPORT_FORMAT, "method": method, "hparams": _jsonable(hparams),
                  "num_features": int(enc.num_features), "data": {"data": data} if data else None,
                  "checkpoint": str(path), "global_step": ckpt.get("global_step")}
    return enc.to(map_location).eval()


# Every built-in method registers itself on import; last, as each of them imports the names above. The
# pretext package imports CPC (a pretext task too) after the tasks it builds on.
import selfsup.pretext  # noqa: E402,F401
import selfsup.ssl.generative.flow  # noqa: E402,F401
import selfsup.ssl.generative.gan  # noqa: E402,F401
import selfsup.ssl.generative.pixelcnn  # noqa: E402,F401
import selfsup.ssl.generative.vae  # noqa: E402,F401
