"""Evaluation encoders without Lightning: input adapters, :class:`ImageEncoder`, each method's encoder built
from its hparams, and :func:`load_encoder`.

A method's class (an :class:`~selfsup.ssl.module.SSLModule`, so a LightningModule) returns its encoder from
the modules it trained (:meth:`~selfsup.ssl.module.SSLModule.encoder`). Evaluation needs that encoder
without the method: an export's ``config.json`` names the method and its hparams, and the builder
registered here for the method (:data:`ENCODER_BUILDERS`) makes the same architecture from them alone,
with the same random draws as the class, so the random-init twin of the evaluation floor is the one the
class would give. Nothing here imports Lightning: ``selfsup features|probe|knn|sweep|report|plot`` and
``selfsup.load_encoder`` of an export never load it. ``tests/test_encoders.py`` checks every registered
method's builder against its class; a method without a builder is built through its class (Lightning).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.data.transforms import to_float
from selfsup.errors import CheckpointError, ConfigError
from selfsup.ssl.backbone import Backbone

EXPORT_FORMAT = 1

# ImageNet statistics: every encoder takes RGB images in [0, 1] and normalises them itself,
# so a notebook user never has to know which constants a run used.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for ``(B, C, H, W)`` images in [0, 1]."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (to_float(x) - self.mean) / self.std


class Lightness(nn.Module):
    """RGB images in [0, 1] (or uint8) -> CIE L channel scaled to [-1, 1]: the input of 1-channel encoders.

    Colorization's backbone sees lightness only; with this as its input adapter, its exported encoder
    still takes RGB, so probes, kNN and notebooks need no special case.

    Shape:
        - Input: ``(B, 3, H, W)`` -> Output: ``(B, 1, H, W)``
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kornia.color import rgb_to_lab

        x = to_float(x)
        if x.shape[1] == 1:  # already grey: L of (g, g, g)
            x = x.expand(-1, 3, -1, -1)
        return rgb_to_lab(x.clamp(0, 1))[:, :1] / 50.0 - 1.0  # L in [0, 100] -> [-1, 1]


class ImageEncoder(nn.Module):
    """RGB images in [0, 1] (or uint8) -> normalised -> backbone -> pooled features.

    This is what :func:`load_encoder` returns for most methods; methods whose evaluation
    features are computed differently (CPC's patch grid, colorization's L channel) return
    their own module from :meth:`SSLModule.encoder`.

    Shape:
        - Input: ``(B, 3, H, W)`` float in [0, 1] or uint8
        - Output: ``(B, num_features)``
    """

    def __init__(self, backbone: Backbone, normalize: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.normalize = Normalize() if normalize is None else normalize
        self.num_features = backbone.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage's map of one pass, by the stage's module name, then ``"out"`` (what :meth:`forward` gives).

        The stage interface of layer-wise evaluation (:mod:`selfsup.eval.layers`); a backbone that does not
        expose its stages gives ``"out"`` only.
        """
        if not self.backbone.has_stages:
            return {"out": self(x)}
        final, stages = self.backbone.forward_intermediates(self.normalize(x))
        return {**dict(zip(self.backbone.stage_names, stages, strict=True)), "out": self.backbone.pool(final)}


EncoderBuilder = Callable[[dict[str, Any]], nn.Module]

ENCODER_BUILDERS: dict[str, EncoderBuilder] = {}
"""Per method name: ``hparams -> encoder``, the architecture (and random init) of ``METHODS[name](**hparams).encoder()``
built without the method's class. ``hparams`` is complete: every argument, defaults filled in."""


def register_encoder(*names: str) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Register a builder of the evaluation encoder of the methods ``names`` in :data:`ENCODER_BUILDERS`.

    A new method whose encoder is its backbone behind :class:`Normalize` (what
    :meth:`~selfsup.ssl.module.SSLModule.encoder` gives) registers :func:`image_encoder`:
    ``register_encoder("mine")(image_encoder)``.
    """

    def deco(fn: EncoderBuilder) -> EncoderBuilder:
        for name in names:
            ENCODER_BUILDERS[name] = fn
        return fn

    return deco


def _trunk(hp: dict[str, Any], in_chans: int = 3) -> Backbone:
    return Backbone(hp["backbone"], in_chans=in_chans, norm=hp["norm"])


def _no_trunk() -> None:
    """The draws of the default trunk that :class:`~selfsup.ssl.module.SSLModule` builds (and a method without
    a trunk drops) before the method's own network: made too, so the random-init twin is the class's."""
    Backbone("convnet_small")


@register_encoder("rotation", "jigsaw", "relative_position", "exemplar", "bigan")
def image_encoder(hp: dict[str, Any]) -> nn.Module:
    """The backbone behind :class:`Normalize`: :meth:`SSLModule.encoder <selfsup.ssl.module.SSLModule.encoder>`."""
    return ImageEncoder(_trunk(hp), Normalize())


@register_encoder("colorization")
def lightness_encoder(hp: dict[str, Any]) -> nn.Module:
    """A 1-channel backbone behind :class:`Lightness`: colorization's encoder."""
    return ImageEncoder(_trunk(hp, in_chans=1), Lightness())


LIGHTNESS_TASKS = frozenset({"colorization"})
"""Pretext tasks that need a lightness-only backbone (``Task.in_chans == 1``; a test checks it against ``TASKS``)."""


@register_encoder("multitask")
def multitask_encoder(hp: dict[str, Any]) -> nn.Module:
    """multitask's backbone: lightness-only when any of its tasks needs it (colorization), else RGB."""
    tasks = {t.strip() for t in str(hp["tasks"]).split(",")}
    return lightness_encoder(hp) if tasks & LIGHTNESS_TASKS else image_encoder(hp)


@register_encoder("dcgan")
def dcgan_encoder(hp: dict[str, Any]) -> nn.Module:
    """DCGAN's discriminator trunk: every stage max-pooled to 4x4 (``all_layers``) or its pooled output."""
    from selfsup.ssl.stage_features import StageFeatureEncoder

    backbone = _trunk(hp)
    if hp["probe_features"] == "all_layers":
        return StageFeatureEncoder(backbone, Normalize())
    return ImageEncoder(backbone, Normalize())


@register_encoder("vae")
def vae_encoder(hp: dict[str, Any]) -> nn.Module:
    """The VAE's posterior mean (``probe_features="mean"``) or its pooled backbone features."""
    from selfsup.ssl.generative.common import PosteriorMeanEncoder

    backbone = _trunk(hp)
    if hp["probe_features"] != "mean":
        return ImageEncoder(backbone, Normalize())
    latent = hp["latent_dim"]
    posterior = nn.Linear(backbone.num_features, 2 * latent)
    with torch.no_grad():  # as VAE.__init__ does
        posterior.bias[latent:].fill_(2 * math.log(0.1))
    return PosteriorMeanEncoder(backbone, Normalize(), posterior)


@register_encoder("flow")
def flow_encoder(hp: dict[str, Any]) -> nn.Module:
    """The flow itself, every scale's latent pooled."""
    from selfsup.ssl.generative.flow_layers import FlowEncoder, MultiScaleFlow

    _no_trunk()
    return FlowEncoder(MultiScaleFlow(3, hp["levels"], hp["steps"], hp["hidden"]))


@register_encoder("pixelcnn")
def pixelcnn_encoder(hp: dict[str, Any]) -> nn.Module:
    """The Gated PixelCNN, one layer averaged over space (``probe_layer``; 0: the middle one)."""
    from selfsup.ssl.generative.pixelcnn_net import GatedPixelCNN, PixelCNNEncoder

    _no_trunk()
    layers = hp["layers"]
    net = GatedPixelCNN(layers, hp["hidden"], hp["kernel"], hp["first_kernel"], hp["logistic_components"])
    return PixelCNNEncoder(net, (hp["probe_layer"] or (layers + 1) // 2) - 1)


@register_encoder("cpc")
def cpc_encoder(hp: dict[str, Any]) -> nn.Module:
    """CPC's patch-grid encoder at its training grid."""
    from selfsup.ssl.patch_grid import PatchEncoder, PatchGrid

    backbone = _trunk(hp)
    geo = PatchGrid.for_image(hp["image_size"], hp["patch_size"], hp["patch_stride"], hp["max_offset"],
                              hp["skip_overlap"])
    return PatchEncoder(backbone, Normalize(), geo.image_size, geo.patch, geo.stride)


def build_encoder(method: str, hparams: dict[str, Any], where: str = "model") -> nn.Module:
    """The evaluation encoder of ``method`` with ``hparams`` (randomly initialised), built without Lightning.

    ``hparams`` are checked as :func:`~selfsup.ssl.module.build_method` checks them (an unknown or misspelt
    argument, a wrong type: one line, ``ConfigError``) against the method's declarations
    (:mod:`selfsup.methods_spec`), and the method's defaults fill in the rest. A method with no builder in
    :data:`ENCODER_BUILDERS` (one registered by a user's own code) is built through its class.
    """
    if not isinstance(method, str) or method not in ENCODER_BUILDERS:
        from selfsup.ssl.module import build_method

        return build_method(method, hparams, where=where).encoder()
    from selfsup.config import check_value
    from selfsup.methods_spec import method_arguments

    if not isinstance(hparams, dict) or not all(isinstance(k, str) for k in hparams):
        raise ConfigError(f"{where}: hparams must be a mapping of {method}'s argument names to values, got {hparams!r}")
    known = method_arguments(method)
    for k in hparams:
        if k not in known:
            import difflib

            close = difflib.get_close_matches(k, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {method} has no argument {k!r}{hint}; known: {', '.join(known)}")
    given = {k: check_value(v, known[k].annotation, f"{where}.{k}") for k, v in hparams.items()}
    return ENCODER_BUILDERS[method]({k: p.default for k, p in known.items()} | given)


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a pretrained encoder from an export directory, a run directory or a Lightning checkpoint.

    Never executes pickled code: an export is ``encoder.safetensors`` + ``config.json``; a checkpoint
    is read with ``torch.load(weights_only=True)``. A run directory gives its ``export/`` when the run
    finished, else its newest checkpoint. The returned module is in eval mode, maps RGB images
    ``(B, 3, H, W)`` in [0, 1] (or uint8) to features ``(B, num_features)``, and has ``num_features``
    and ``config`` attributes. An export is read without importing Lightning (:func:`build_encoder`); a
    checkpoint, a Lightning file, is read through the method's class.

    >>> enc = load_encoder("runs/rotation")  # doctest: +SKIP
    >>> feats = enc(images)  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        from selfsup.ssl.module import _encoder_from_checkpoint

        return _encoder_from_checkpoint(path, map_location)
    if (path / "export" / "config.json").is_file():
        path = path / "export"
    elif path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        ckpts = sorted((path / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if ckpts:
            from selfsup.ssl.module import _encoder_from_checkpoint

            return _encoder_from_checkpoint(ckpts[-1], map_location)
    cfg_path, weights = path / "config.json", path / "encoder.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise ConfigError(
                f"{p} not found: expected an export directory (written by SSLModule.export), a run directory "
                "(runs/<name>) or a .ckpt file"
            )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{cfg_path} is not a readable export config ({err})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{cfg_path}: unsupported export format {got!r}")
    for key in ("method", "hparams"):
        if key not in config:
            raise CheckpointError(f"{cfg_path}: no {key!r} entry; expected a config written by SSLModule.export")
    enc = build_encoder(config["method"], config["hparams"], where=str(cfg_path))
    recorded = config.get("num_features")
    if isinstance(recorded, int) and recorded != int(enc.num_features):
        # same weights, other features: a default changed since the export (DCGAN's probe_features did)
        from selfsup.methods_spec import method_arguments

        unset = [k for k in method_arguments(config["method"]) if k not in config["hparams"]]
        hint = f"; arguments it does not record, now at their defaults: {', '.join(unset)}" if unset else ""
        raise CheckpointError(f"{cfg_path}: exported with {recorded} features, but {config['method']} now builds "
                              f"{enc.num_features} from its hparams{hint}")
    from safetensors.torch import load as safetensors_load
    from safetensors.torch import load_file

    from selfsup.names import is_utf8_name

    try:
        if is_utf8_name(str(weights)):
            state = load_file(str(weights), device=str(map_location))
        else:  # safetensors opens only UTF-8 paths: read the bytes here
            state = {k: v.to(str(map_location)) for k, v in safetensors_load(weights.read_bytes()).items()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a bad file
        raise CheckpointError(f"{weights} cannot be read (empty, truncated or not safetensors): {err}") from None
    own = enc.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {k}: weights {tuple(state[k].shape)} "
                         f"vs config {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        raise CheckpointError(f"{weights} does not match {cfg_path}: {'; '.join(parts)}")
    enc.load_state_dict(state, strict=True)
    enc.config = config
    enc.source_dir = path  # not in config: the features' cache key hashes config
    return enc.to(map_location).eval()
