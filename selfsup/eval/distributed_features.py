"""Feature extraction under Lightning's ``Trainer.predict``: several devices or nodes with DDP.

:func:`selfsup.eval.features.extract_features` runs a plain loop on one device and comes here only when
its settings ask for several processes; this is the one part of evaluation that imports Lightning.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from selfsup.eval.features import _CacheWriter, check_features
from selfsup.progress import BarCallback
from selfsup.quiet import quiet_lightning


class _Extractor(pl.LightningModule):
    """Runs the frozen encoder in ``predict``; each rank keeps its (indices, features, labels)."""

    def __init__(self, encoder: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_dtype = dtype
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.sink: _CacheWriter | None = None  # single process: rows go straight to the cache file

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        idx, images, labels = batch
        feats = check_features(self.encoder(images).float())
        chunk = (idx.cpu(), feats.to(self.out_dtype).cpu(), labels.cpu())
        if self.sink is not None:
            self.sink.write(*chunk)
        else:
            self.chunks.append(chunk)
        return None


class PredictionBar(BarCallback):
    """A bar over the images a ``Trainer.predict`` runs through, labelled with what it computes.

    Lightning's own bar counts batches under the word "Predicting"; this one reads e.g.
    ``extract rotation-convnet_small train (50,000 images)`` and counts images. Rank 0 draws it for all
    ranks (each batch there stands for ``world_size`` batches).

    Args:
        description: the bar's label.
        total: number of images.
        console: where to draw (see :func:`make_progress`).
    """

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start(trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.progress is not None:
            self.advance(self.progress.tasks[0].completed + len(batch[0]) * trainer.world_size)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop()


def extract_distributed(
    encoder: nn.Module, loader, total: int, key: str, make_writer, *, dtype: torch.dtype, cache_dir: Path,
    description: str | None, trainer_kw: dict,
) -> None:
    """Run ``encoder`` over ``loader`` under ``Trainer.predict`` and stream the rows into ``make_writer()``; with
    several ranks each saves its rows to a shard and rank 0 writes them in dataset order."""
    module = _Extractor(encoder, dtype)
    callbacks = [] if description is None else [PredictionBar(description, total)]
    with quiet_lightning():
        trainer = pl.Trainer(
            **trainer_kw, logger=False,
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
            inference_mode=True, callbacks=callbacks,
        )
        world = trainer.world_size
        if world == 1:
            module.sink = make_writer()
        try:
            trainer.predict(module, dataloaders=loader, return_predictions=False)
        except BaseException:  # an error, Ctrl-C or SIGTERM: the half-filled file goes now, not at the next run
            if module.sink is not None:
                module.sink.discard()
            raise

    rank = trainer.global_rank
    if world == 1:
        module.sink.close()
        return
    # Several ranks: each saves its rows with their indices; rank 0 streams them into the cache.
    shard_dir = cache_dir / f"{key}.shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    torch.save(module.chunks, shard_dir / f"rank{rank}.pt")
    module.chunks = []
    trainer.strategy.barrier("features-shards")
    if rank == 0:
        shards = [shard_dir / f"rank{r}.pt" for r in range(world)]
        writer = make_writer()
        for shard in shards:
            for chunk in torch.load(shard):
                writer.write(*chunk)
            shard.unlink()
        writer.close()
        shard_dir.rmdir()
    trainer.strategy.barrier("features-written")
