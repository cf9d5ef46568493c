"""Stop a diverged run at the step it diverged, before a NaN weight reaches a checkpoint."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from selfsup.errors import TrainingError


class DivergenceGuard(Callback):
    """Raise :class:`TrainingError` on a NaN or infinite loss (before its backward pass and optimiser
    step) and refuse to write a checkpoint holding a non-finite weight, so the last good checkpoint is
    never overwritten by a diverged model.

    Covers automatic and manual optimisation alike (Lightning calls ``on_before_backward`` for both).
    The finiteness check reads one scalar per step (one device sync, as the progress bar's loss does).
    """

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._stop(trainer, f"the loss is {float(loss.detach().float().sum())}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for name, t in checkpoint.get("state_dict", {}).items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                self._stop(trainer, f"weight {name} is not finite")

    @staticmethod
    def _stop(trainer: pl.Trainer, what: str) -> None:
        step = trainer.global_step
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        raise TrainingError(
            f"training diverged at step {step} (epoch {trainer.current_epoch}, batch {batch}): {what}; "
            f"no checkpoint was written from it. Lower --lr (or raise --warmup-epochs) and --resume, "
            f"which continues from the last good checkpoint"
        )
