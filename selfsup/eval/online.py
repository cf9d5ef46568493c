"""Online linear probe: a Callback that trains a linear classifier on detached features during pretraining.

It reuses the features a method returns from its training step (``out["features"]``) when there are
any, so it costs one small matrix product per step. It is safe under DDP and across resume, the two
places Lightning Bolts' ``SSLOnlineEvaluator`` broke (its issues #727 and #953):

- DDP: each rank all-gathers the batch's features and labels, so every rank takes the same step on
  the same data from the same initial head; the heads never drift apart and need no gradient sync.
  Validation counts are summed over ranks before the accuracy is logged.
- Resume: the head and its optimiser live in the callback's ``state_dict``, which Lightning stores
  in the checkpoint and restores before training continues.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn


class OnlineLinearProbe(Callback):
    """Train ``BatchNorm1d(affine=False) -> Linear`` on detached pooled features; log ``val/online_top1``.

    Args:
        num_classes: number of classes of the labelled data.
        lr: Adam learning rate of the probe.
        seed: seed of the head's initialisation (the same on every rank).
    """

    def __init__(self, num_classes: int, lr: float = 1e-3, seed: int = 0) -> None:
        if num_classes < 2:
            raise ValueError(f"the online probe needs at least 2 classes, got {num_classes!r}")
        self.num_classes, self.lr, self.seed = num_classes, lr, seed
        self.head: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None
        self._correct1 = self._correct5 = self._total = 0
        self.last_top1: float | None = None
        self.last_top5: float | None = None

    @property
    def state_key(self) -> str:
        return "OnlineLinearProbe"

    def _build(self, num_features: int, device: torch.device) -> None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        self.head = nn.Sequential(nn.BatchNorm1d(num_features, affine=False), nn.Linear(num_features, self.num_classes))
        torch.random.set_rng_state(gen_state)
        self.head.to(device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.lr)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.head is None:
            self._build(pl_module.num_features, pl_module.device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # setup() may run before the strategy moved the module to its device.
        self.head.to(pl_module.device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v):
                    state[k] = v.to(pl_module.device)

    def _features(self, pl_module: pl.LightningModule, outputs, images: torch.Tensor) -> torch.Tensor:
        feats = outputs.get("features") if isinstance(outputs, dict) else None
        if feats is None:
            feats = pl_module.encode(images)
        return feats.detach().float()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        feats = self._features(pl_module, outputs, images)
        if trainer.world_size > 1:
            # (W, B, D) -> (W*B, D): every rank trains on the global batch, so heads stay identical.
            feats = pl_module.all_gather(feats).flatten(0, 1)
            labels = pl_module.all_gather(labels).flatten(0, 1)
        keep = labels >= 0
        if keep.sum() < 2:
            return
        self.head.train()
        with torch.enable_grad(), torch.autocast(feats.device.type, enabled=False):
            loss = F.cross_entropy(self.head(feats[keep]), labels[keep])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        pl_module.log("train/online_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=int(keep.sum()))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._correct1 = self._correct5 = self._total = 0

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        images, labels = batch[0], batch[1]
        keep = labels >= 0
        feats = pl_module.encode(images[keep]).float()
        self.head.eval()
        logits = self.head(feats)
        topk = logits.topk(min(5, self.num_classes), dim=1).indices  # (B, k)
        hits = topk == labels[keep, None]
        self._correct1 += hits[:, 0].sum()
        self._correct5 += hits.any(1).sum()
        self._total += int(keep.sum())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        counts = torch.tensor(
            [float(self._correct1), float(self._correct5), float(self._total)], device=pl_module.device
        )
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        if counts[2] == 0:
            return
        self.last_top1 = float(100 * counts[0] / counts[2])
        self.last_top5 = float(100 * counts[1] / counts[2])
        pl_module.log("val/online_top1", self.last_top1, prog_bar=True, sync_dist=False)
        pl_module.log("val/online_top5", self.last_top5, sync_dist=False)

    def state_dict(self) -> dict:
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def _load(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.head is None:
            self._pending_state = state_dict
        else:
            self._load(state_dict)


class FrozenEncoder(pl.LightningModule):
    """A LightningModule that only runs an encoder without training it, for the online probe's floor.

    Fitting it with :class:`OnlineLinearProbe` trains the probe on the encoder's fixed features
    (norm-layer running statistics still adapt in training mode, as they would for any encoder
    evaluated this way), giving the random-init baseline on exactly the probe's terms.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.frozen = encoder.requires_grad_(False)
        self.num_features = encoder.num_features

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(x)

    def training_step(self, batch, batch_idx: int):
        return {"features": self.encode(batch[0])}

    def validation_step(self, batch, batch_idx: int):
        return None

    def configure_optimizers(self):
        return None
