"""End-to-end training of an encoder plus a linear head on a label subset.

Two uses, one code path: **fine-tuning** a pretrained encoder (CPC v2's label-efficiency experiments
train the whole network on the labelled subset) and the **supervised baseline** (the same backbone
from random initialisation, trained on the same subset). Training runs a fixed number of steps
whatever the subset size, so one label per class and all labels get the same optimisation budget.

- [0] CPC v2, 2019, https://arxiv.org/abs/1905.09272
"""

from __future__ import annotations

import copy

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from selfsup.data.datasets import batch_collate
from selfsup.data.transforms import make_augment, to_float
from selfsup.errors import ConfigError
from selfsup.progress import BarCallback
from selfsup.quiet import quiet_lightning


class StepBar(BarCallback):
    """A transient bar over a fine-tuning run's optimiser steps: ``fine-tune NAME  ━━━  120/300 steps``.

    Args:
        description: what is being trained (the encoder, its label count and seed).
        total: the number of optimiser steps the run takes.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        self.start(trainer, TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                   TimeElapsedColumn(), transient=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.advance(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop()


class Classifier(pl.LightningModule):
    """An encoder (RGB in [0, 1] -> (B, D)) with a linear head, trained with AdamW and cross-entropy.

    Args:
        encoder: the module to train (fine-tuned in place: pass a copy to keep the original).
        num_classes: number of classes.
        lr: head learning rate; the encoder uses ``lr * encoder_lr_scale``.
        encoder_lr_scale: 0.1 for fine-tuning a pretrained encoder, 1 for training from scratch.
        weight_decay: AdamW weight decay.
        crop_scale: smallest area fraction of the training crops.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        encoder_lr_scale: float = 1.0,
        weight_decay: float = 1e-4,
        crop_scale: float = 0.6,
    ) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(True)
        self.head = nn.Linear(encoder.num_features, num_classes)
        self.lr, self.encoder_lr_scale, self.weight_decay = lr, encoder_lr_scale, weight_decay
        self.crop_scale = crop_scale
        self._augment: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx: int):
        x, y = to_float(batch[0]), batch[1]
        if self._augment is None:
            self._augment = make_augment(x.shape[-1], crop_scale=(self.crop_scale, 1.0), flip=False)
        loss = F.cross_entropy(self(self._augment(x)), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        groups = [
            {"params": self.encoder.parameters(), "lr": self.lr * self.encoder_lr_scale},
            {"params": self.head.parameters(), "lr": self.lr},
        ]
        opt = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def predict_scores(model: nn.Module, dataset, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores and labels of every image of ``dataset``, in order, with ``model`` in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=batch_collate)
    scores, labels = [], []
    for x, y in loader:
        scores.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(scores), torch.cat(labels)


def train_classifier(
    encoder: nn.Module,
    train_set,
    test_set,
    subset: np.ndarray,
    num_classes: int,
    *,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    encoder_lr_scale: float = 1.0,
    seed: int = 0,
    accelerator: str = "auto",
    progress: bool | str = False,
) -> dict[str, float]:
    """Train a copy of ``encoder`` + a linear head on ``train_set[subset]``; top-1/top-5 (%) on ``test_set``.

    ``progress`` (True, or the text to show) draws a bar over the optimiser steps (:class:`StepBar`).
    """
    if len(subset) == 0:
        raise ConfigError("train_classifier got an empty label subset")
    pl.seed_everything(seed, verbose=False)
    model = Classifier(copy.deepcopy(encoder), num_classes, lr=lr, encoder_lr_scale=encoder_lr_scale)
    loader = DataLoader(
        Subset(train_set, subset.tolist()), batch_size=min(batch_size, len(subset)), shuffle=True,
        collate_fn=batch_collate,
    )
    with quiet_lightning():
        trainer = pl.Trainer(
            max_steps=steps, max_epochs=-1, accelerator=accelerator, devices=1, logger=False,
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
            callbacks=[StepBar(progress if isinstance(progress, str) else f"fine-tune on {len(subset)} labels",
                               steps)] if progress else [],
        )
        trainer.fit(model, train_dataloaders=loader)
    scores, labels = predict_scores(model, test_set)
    k = min(5, num_classes)
    topk = scores.topk(k, dim=1).indices
    return {
        "top1": float(100 * (topk[:, 0] == labels).float().mean()),
        "top5": float(100 * (topk == labels[:, None]).any(1).float().mean()),
    }
