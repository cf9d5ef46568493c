"""Adversarial representation learners: BiGAN/ALI (the encoder is the backbone) and DCGAN (the discriminator is).

Both share one DCGAN generator, the adversarial losses, the two-player manual optimisation and the
sample grids written into the run directory after every training epoch (``samples/epoch_XXX.png``;
BiGAN also ``samples/recon_epoch_XXX.png``: real images, then ``G(E(x))`` below each).

- [0] DCGAN, Radford et al. 2016, https://arxiv.org/abs/1511.06434
- [1] BiGAN, Donahue et al. 2017, https://arxiv.org/abs/1605.09782
- [2] ALI, Dumoulin et al. 2017, https://arxiv.org/abs/1606.00704
- [3] Spectral normalisation, Miyato et al. 2018, https://arxiv.org/abs/1802.05957
- [4] Hinge loss for GANs, Lim & Ye 2017, https://arxiv.org/abs/1705.02894
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from selfsup.checkpoint import atomic_write_text
from selfsup.errors import ConfigError
from selfsup.ssl.module import ImageEncoder, SSLModule, register_method
from selfsup.ssl.stage_features import GRID, StageFeatureEncoder, max_pool_stages

GAN_LOSSES = ("hinge", "ns")
PROBE_FEATURES = {  # DCGAN's probed features, as its export note and start-up line say them
    "all_layers": "every stage of the DCGAN discriminator's backbone max-pooled to 4x4, flattened and "
                  "concatenated (Radford et al. 2016, sec. 5.1)",
    "pooled": "the global-average-pooled last layer of the DCGAN discriminator",
}
ADAM_BETAS = (0.5, 0.999)  # the GAN norm since DCGAN: a short momentum memory for a moving target


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The discriminator's loss on real and fake logits: hinge [4] or the standard cross-entropy [0].

    Shape:
        - real, fake: ``(B,)`` logits -> scalar
    """
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()  # -log D(real) - log(1 - D(fake))


def generator_loss(fake: torch.Tensor, real: torch.Tensor | None = None, kind: str = "hinge") -> torch.Tensor:
    """The generator's (and BiGAN's encoder's) loss: fool D on fakes and, when ``real`` is given, on reals.

    Non-saturating (``ns``) swaps the labels, ``-log D(fake) - log(1 - D(real))``; hinge [4] is linear,
    ``-D(fake) + D(real)``. ``real`` is BiGAN's ``(x, E(x))`` pairs, which the encoder makes look fake.

    Shape:
        - fake, real: ``(B,)`` logits -> scalar
    """
    if kind == "hinge":
        loss = -fake.mean()
        return loss if real is None else loss + real.mean()
    loss = F.softplus(-fake).mean()
    return loss if real is None else loss + F.softplus(real).mean()


def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance between distinct images of a batch: near 0 when a generator has collapsed.

    Shape:
        - Input: ``(B, ...)`` with ``B >= 2`` -> scalar
    """
    flat = x.flatten(1).float()  # (B, ...) -> (B, P)
    d = torch.cdist(flat, flat)  # (B, B)
    n = flat.shape[0]
    return d.sum() / (n * (n - 1))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write images ``(B, 3, H, W)`` in [0, 1] as one PNG grid, ``nrow`` images per row."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().clamp(0, 1).cpu(), str(path), nrow=nrow, padding=1)
    return path


def _levels(image_size: int) -> tuple[int, int]:
    """(number of 2x up/down-samplings between 4x4 and the image, the power-of-two side generated)."""
    if image_size < 8:
        raise ConfigError(f"GANs need images of at least 8 px, got image_size={image_size!r}")
    side = 1 << math.ceil(math.log2(image_size))
    return int(math.log2(side // 4)), side


class Generator(nn.Module):
    """DCGAN generator [0]: ``z`` -> 4x4 map -> stride-2 transposed convs with batch norm -> RGB in [0, 1].

    Sizes that are not a power of two are generated at the next one and resized (antialiased).

    Args:
        z_dim: latent dimension.
        image_size: side of the square images generated.
        width: channels of the last hidden layer; each coarser layer doubles them (capped at 8x).

    Shape:
        - Input: ``(B, z_dim)`` -> Output: ``(B, 3, image_size, image_size)`` in [0, 1]
    """

    def __init__(self, z_dim: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        n_up, self.side = _levels(image_size)
        self.image_size = image_size
        chans = [width * min(8, 2 ** (n_up - 1 - i)) for i in range(n_up)]  # coarse -> fine
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, chans[0], 4, 1, 0, bias=False), nn.BatchNorm2d(chans[0]), nn.ReLU(True)
        ]
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(chans[-1], 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN's N(0, 0.02) init: PyTorch's default starts G at full-range
            if isinstance(m, nn.ConvTranspose2d):  # pixel noise that Adam's small steps take long to undo
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.net(z[:, :, None, None])  # (B, z_dim) -> (B, z_dim, 1, 1) -> (B, 3, side, side)
        if self.side != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return (x + 1) / 2


class JointDiscriminator(nn.Module):
    """BiGAN/ALI's D(x, z) [1, 2]: a conv branch on x, an MLP on z, an MLP on both; spectral norm on every layer [3].

    Args:
        z_dim: latent dimension.
        image_size: side of the images.
        width: channels of the first conv (doubled at each stride-2 conv).
        hidden: width of the z branch and the joint MLP.

    Shape:
        - Input: ``(B, 3, H, W)`` normalised images and ``(B, z_dim)`` codes -> Output: ``(B,)`` logits
    """

    def __init__(self, z_dim: int, image_size: int, width: int = 64, hidden: int = 512) -> None:
        super().__init__()
        n_down, _ = _levels(image_size)
        layers, cin = [], 3
        for i in range(n_down):
            cout = width * 2 ** min(i, 3)
            layers += [spectral_norm(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
            cin = cout
        self.x_net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())  # (B, cin * 16)
        self.z_net = nn.Sequential(
            spectral_norm(nn.Linear(z_dim, hidden)), nn.LeakyReLU(0.2, True),
            spectral_norm(nn.Linear(hidden, hidden)), nn.LeakyReLU(0.2, True),
        )
        self.joint = nn.Sequential(
            spectral_norm(nn.Linear(cin * 16 + hidden, 2 * hidden)), nn.LeakyReLU(0.2, True),
            spectral_norm(nn.Linear(2 * hidden, 1)),
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.joint(torch.cat([self.x_net(x), self.z_net(z)], dim=1)).squeeze(1)  # (B, 1) -> (B,)


class AdversarialModule(SSLModule):
    """Two players trained by Lightning manual optimisation: D, then G (and E) on the same batch.

    A subclass says what D looks at (:meth:`discriminate`), which parameters are D's
    (:meth:`discriminator_parameters`) and, for BiGAN, how an image is encoded (:meth:`encode_latent`).
    ``trainer.global_step`` counts optimiser steps: two per batch. Each player gets its own optimiser
    (AdamW by default, with DCGAN's betas (0.5, 0.999)) and its own warm-up + cosine schedule.

    Args:
        z_dim: latent dimension of the generator.
        g_width: channels of the generator's last hidden layer.
        gan_loss: ``hinge`` (with spectral norm, the stable choice) or ``ns`` (non-saturating cross-entropy).
        image_size: side of the generated images; follows the data.
        num_samples: images in the sample grid written after every epoch (0: none).
    """

    base_defaults = {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "warmup_epochs": 0.0, "crop_scale": 1.0}
    optimizer_steps_per_batch = 2  # D's step, then G's (and E's)

    def __init__(self, *, z_dim: int = 128, g_width: int = 64, gan_loss: str = "hinge", image_size: int = 32,
                 num_samples: int = 64, **base) -> None:
        super().__init__(**(self.base_defaults | base))
        if gan_loss not in GAN_LOSSES:
            raise ConfigError(f"gan_loss must be one of {GAN_LOSSES}, got {gan_loss!r}")
        if z_dim < 1 or g_width < 1 or num_samples < 0:
            raise ConfigError(f"z_dim and g_width must be positive, num_samples >= 0; got {z_dim!r}, "
                              f"{g_width!r}, {num_samples!r}")
        self.automatic_optimization = False
        self.generator = Generator(z_dim, image_size, g_width)
        self._grid_real: torch.Tensor | None = None

    # -- what a subclass says ---------------------------------------------------------------------
    def discriminate(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """D's logits ``(B,)`` for normalised images ``x`` paired with codes ``z``."""
        raise NotImplementedError

    def discriminator_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def encode_latent(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Normalised images -> (E(x) or None, detached pooled features for the online probe or None)."""
        return None, None

    def generator_parameters(self) -> list[nn.Parameter]:
        """Everything that is not D's: G's (and BiGAN's E's) parameters."""
        d = {id(p) for p in self.discriminator_parameters()}
        return [p for p in self.parameters() if id(p) not in d]

    # -- the two players' losses ------------------------------------------------------------------
    def sample_z(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` codes from the prior N(0, I) ``(n, z_dim)``."""
        z = torch.randn(n, self.hparams.z_dim, generator=generator)
        return z.to(self.device)

    def d_logits(self, x, fake, z, code, features: bool = False):
        """D's logits ``(B,)`` on the real pairs ``(x, code)`` and the fake pairs ``(fake, z)``, and ``None``.

        With ``features``, a D whose features are the probed ones (DCGAN) gives them for the reals,
        detached ``(B, num_features)``, from the same pass in place of ``None``.
        """
        return self.discriminate(x, code), self.discriminate(fake, z), None

    def d_loss(self, x, fake, z, code) -> dict[str, torch.Tensor]:
        """D's loss on real ``(x, code)`` and fake ``(fake, z)``, both detached from G and E.

        The dict also holds ``features`` when D computed the probed features of the reals on the way.
        """
        real_logits, fake_logits, feats = self.d_logits(
            x, fake.detach(), z, None if code is None else code.detach(), features=True
        )
        out = {
            "d_loss": discriminator_loss(real_logits, fake_logits, self.hparams.gan_loss),
            "d_real_acc": (real_logits > 0).float().mean(),
            "d_fake_acc": (fake_logits < 0).float().mean(),
        }
        if feats is not None:
            out["features"] = feats
        return out

    def g_loss(self, x, fake, z, code) -> torch.Tensor:
        """G's (and E's) loss: D's verdict on the fakes, and on the encoded reals when there is an encoder."""
        real_logits, fake_logits, _ = self.d_logits(x, fake, z, code)
        return generator_loss(fake_logits, None if code is None else real_logits, self.hparams.gan_loss)

    def players(self, batch, z: torch.Tensor | None = None):
        """One batch -> normalised reals, normalised fakes G(z), z, E(x) (or None), E's probe features (or None)."""
        x = self.normalize(self.augment(batch[0]))  # (B, 3, H, W)
        z = self.sample_z(x.shape[0]) if z is None else z
        fake = self.normalize(self.generator(z))
        code, feats = self.encode_latent(x)
        return x, fake, z, code, feats

    def loss(self, batch, z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Both players' losses on a batch, no step (``loss`` is G's); training uses :meth:`training_step`."""
        x, fake, z, code, feats = self.players(batch, z)
        out = self.d_loss(x, fake, z, code)
        out["g_loss"] = self.g_loss(x, fake, z, code)
        out["loss"] = out["g_loss"]
        if feats is not None:
            out["features"] = feats
        return out

    # -- manual optimisation ----------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        if self._grid_real is None and self.hparams.num_samples:
            self._grid_real = batch[0][: min(8, self.hparams.num_samples)].detach()
        opt_d, opt_g = self.optimizers()
        x, fake, z, code, feats = self.players(batch)  # G(z) and E(x) once: D sees them detached
        with self.toggled_optimizer(opt_d):
            out = self.d_loss(x, fake, z, code)
            feats = out.pop("features", feats)  # DCGAN's: D's features of the reals, from D's own pass
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(out["d_loss"])
            opt_d.step()
        with self.toggled_optimizer(opt_g):  # D's parameters are frozen: no gradient is computed for them
            out["g_loss"] = self.g_loss(x, fake, z, code)
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(out["g_loss"])
            opt_g.step()
        for sched in self.lr_schedulers():
            sched.step()
        n = x.shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, on_step=True, on_epoch=False, batch_size=n)
        self.log("loss", out["g_loss"].detach(), prog_bar=True, logger=False, batch_size=n)
        out = {k: v.detach() for k, v in out.items()}
        if feats is not None:
            out["features"] = feats
        return out

    def lr_lambda(self):
        schedule, t = super().lr_lambda(), self.trainer
        if t.max_steps > 0 and t.estimated_stepping_batches == t.max_steps:
            # --max-steps counts both players' steps, the schedulers step once per batch
            return lambda batch: schedule(self.optimizer_steps_per_batch * batch)
        return schedule

    def configure_optimizers(self):
        out = []
        for params in (self.discriminator_parameters(), self.generator_parameters()):
            opt = self.build_optimizer(params)
            if isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
                for group in opt.param_groups:
                    group["betas"] = ADAM_BETAS
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda())
            out.append({"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}})
        return tuple(out)

    # -- samples ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, seed: int | None = 0) -> torch.Tensor:
        """``n`` images ``(n, 3, S, S)`` in [0, 1] from G in eval mode; a fixed ``seed`` gives the same codes."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        was = self.generator.training
        self.generator.eval()
        images = self.generator(self.sample_z(n, gen))
        self.generator.train(was)
        return images

    def grids(self) -> dict[str, torch.Tensor]:
        """Images to write after an epoch, by file prefix: ``epoch`` (samples) and subclass extras."""
        return {"epoch": self.sample(self.hparams.num_samples)}

    def on_train_epoch_end(self) -> None:
        if not self.hparams.num_samples:
            return
        grids = self.grids()
        if self._grid_real is not None and self.hparams.num_samples >= 2:
            real = self._grid_real.float() / 255 if self._grid_real.dtype == torch.uint8 else self._grid_real
            # 1 = as diverse as real images of the same batch; near 0 = mode collapse
            diversity = mean_pairwise_distance(grids["epoch"]) / mean_pairwise_distance(real).clamp_min(1e-8)
            self.log("train/sample_diversity", diversity, on_step=False, on_epoch=True)
        if self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir) / "samples"
            for prefix, images in grids.items():
                save_grid(images, out / f"{prefix}_{self.current_epoch:03d}.png")


@register_method("bigan")
class BiGAN(AdversarialModule):
    """BiGAN / ALI [1, 2]: E(x) = linear(backbone(x)) learns to invert G(z), judged by a joint D(x, z).

    D must tell real pairs ``(x, E(x))`` from fake pairs ``(G(z), z)``; at the optimum E inverts G.
    The encoder that is exported and probed is E's pooled backbone output (normalised RGB in).

    Args:
        d_width: channels of the first conv of D's image branch.
        d_hidden: width of D's code branch and joint MLP.
    """

    def __init__(self, *, d_width: int = 64, d_hidden: int = 512, **base) -> None:
        super().__init__(**(self.base_defaults | base))
        self.to_z = nn.Linear(self.num_features, self.hparams.z_dim)
        self.discriminator = JointDiscriminator(self.hparams.z_dim, self.hparams.image_size, d_width, d_hidden)

    def encode_latent(self, x):
        feats = self.backbone(x)  # (B, D)
        return self.to_z(feats), feats.detach()

    def discriminate(self, x, z):
        return self.discriminator(x, z)

    def discriminator_parameters(self):
        return list(self.discriminator.parameters())

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images in [0, 1] (or uint8) -> G(E(x)) in [0, 1], in eval mode. Shape: ``(B, 3, H, W)``."""
        was = self.training
        self.eval()
        code, _ = self.encode_latent(self.normalize(images.to(self.device)))
        out = self.generator(code)
        self.train(was)
        return out

    def grids(self):
        grids = super().grids()
        if self._grid_real is not None:
            real = self._grid_real.float() / 255
            recon = self.reconstruct(real)
            grids["recon_epoch"] = torch.cat([real, recon])  # row 1 real, row 2 G(E(x)) beneath
        return grids


@register_method("dcgan")
class DCGAN(AdversarialModule):
    """DCGAN [0] whose discriminator trunk is the shared backbone, plus a spectrally normalised linear head.

    The probed (exported) features are, by default, the paper's (section 5.1): every stage of the
    discriminator's backbone max-pooled to a 4x4 grid, flattened and concatenated
    (:mod:`selfsup.ssl.stage_features`): 5,632 features on ``convnet_small``, 16,384 on
    ``cifar_resnet18`` (the default backbone), at any image size. Radford et al. trained their
    discriminator on ImageNet-1k and reached 82.8% on CIFAR-10 with a regularised L2-SVM on them;
    ours is trained on the data it is probed on, so the numbers are not comparable.

    Real and fake images go through D as one batch: the backbone's batch norm (after its first conv,
    where the paper had none) would otherwise normalise each batch's colour statistics away. The
    online probe reads D's features of the (augmented, normalised) reals from that same pass.

    Args:
        probe_features: ``all_layers`` (the paper's: every stage of D's backbone max-pooled to 4x4 and
            concatenated) or ``pooled`` (its global-average-pooled last layer); recorded in the export's
            config and note.
    """

    def __init__(self, *, probe_features: str = "all_layers", **base) -> None:
        super().__init__(**(self.base_defaults | base))
        if probe_features not in PROBE_FEATURES:
            raise ConfigError(f"probe_features must be one of {tuple(PROBE_FEATURES)}, got {probe_features!r}")
        if probe_features == "all_layers" and not self.backbone.has_stages:
            raise ConfigError(f"dcgan: probe_features='all_layers' reads every stage of the backbone, and "
                              f"{self.backbone.name!r} does not expose them (timm's forward_intermediates and "
                              "feature_info); use probe_features='pooled'")
        self.head = spectral_norm(nn.Linear(self.backbone.num_features, 1))

    @property
    def num_features(self) -> int:
        if self.hparams.probe_features == "all_layers":
            return GRID * GRID * sum(self.backbone.stage_channels)
        return self.backbone.num_features

    def encoder(self) -> nn.Module:
        if self.hparams.probe_features == "all_layers":
            return StageFeatureEncoder(self.backbone, self.normalize)
        return ImageEncoder(self.backbone, self.normalize)

    def discriminate(self, x, z):
        return self.head(self.backbone(x)).squeeze(1)  # (B, 1) -> (B,)

    def d_logits(self, x, fake, z, code, features: bool = False):
        b = x.shape[0]
        both = torch.cat([x, fake])  # (2B, 3, H, W): reals first
        stages = None
        if features and self.hparams.probe_features == "all_layers":
            last, stages = self.backbone.forward_intermediates(both)  # the same pass as forward_features
        else:
            last = self.backbone.forward_features(both)
        pooled = self.backbone.pool(last)  # (2B, D)
        logits = self.head(pooled).squeeze(1)  # (2B, 1) -> (2B,)
        feats = None
        if features:  # the reals' rows: (B, num_features)
            feats = (pooled[:b] if stages is None else max_pool_stages([s[:b] for s in stages])).detach()
        return logits[:b], logits[b:], feats

    def discriminator_parameters(self):
        return [*self.backbone.parameters(), *self.head.parameters()]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.is_global_zero:
            print(f"dcgan: features probed (online and exported): {PROBE_FEATURES[self.hparams.probe_features]} "
                  f"({self.num_features} features)")

    def export(self, directory, data=None):
        directory = super().export(directory, data)
        cfg = json.loads((directory / "config.json").read_text())
        # top level, not only in hparams: an evaluation's result JSON records the config without its hparams
        cfg["probe_features"] = self.hparams.probe_features
        cfg["note"] = (f"features: {PROBE_FEATURES[self.hparams.probe_features]}; the discriminator was trained "
                       "on this data (Radford et al.'s on ImageNet-1k)")
        atomic_write_text(directory / "config.json", json.dumps(cfg, indent=2) + "\n")
        return directory
