"""``selfsup demo``: rotation pretraining on the embedded digits, against the random-init floor.

Needs no files and no network: the data is scikit-learn's bundled handwritten digits.
"""

from __future__ import annotations

import json

import pytorch_lightning as pl
from rich.console import Console
from rich.table import Table
from torch import nn

from selfsup.data.datamodule import SelfSupDataModule
from selfsup.eval.online import FrozenEncoder, OnlineLinearProbe
from selfsup.ssl.module import METHODS
from selfsup.train import pretrain


def probe_frozen(encoder: nn.Module, dm: SelfSupDataModule, epochs: int, seed: int = 0) -> tuple[float, float]:
    """Top-1/top-5 (%) of the online probe trained for ``epochs`` on a frozen encoder's features."""
    pl.seed_everything(seed, verbose=False)
    probe = OnlineLinearProbe(dm.num_classes, seed=seed)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        callbacks=[probe], num_sanity_val_steps=0, check_val_every_n_epoch=epochs, enable_model_summary=False,
    )
    trainer.fit(FrozenEncoder(encoder), datamodule=dm)
    return probe.last_top1, probe.last_top5


def run_demo(
    epochs: int = 30, probe_epochs: int = 30, backbone: str = "convnet_small", output: str = "runs", seed: int = 0
) -> dict:
    """Pretrain rotation on digits, probe it and a random-init twin the same way, print and return the table."""
    console = Console()
    console.print(f"[bold]selfsup demo[/]: rotation pretraining of {backbone} on the embedded digits ({epochs} epochs)")
    config = {
        "method": "rotation",
        "model": {"backbone": backbone, "lr": 0.05, "warmup_epochs": 2.0, "crop_scale": 0.7, "flip": False},
        "data": {"data": "digits", "batch_size": 128, "image_size": 16},
        "trainer": {"max_epochs": epochs, "log_every_n_steps": 5, "check_val_every_n_epoch": max(1, epochs // 3)},
        "seed": seed,
        "output": output,
    }
    run = pretrain(config)
    dm = run.datamodule

    rows = {"pretrained (online probe, during pretraining)": (run.probe.last_top1, run.probe.last_top5)}
    console.print(f"probing the frozen pretrained and random-init encoders ({probe_epochs} epochs each)")
    rows["pretrained (frozen probe)"] = probe_frozen(run.model.encoder(), dm, probe_epochs, seed)
    pl.seed_everything(seed + 1, verbose=False)
    random_model = METHODS["rotation"](**dict(run.model.hparams))
    rows["random init, same architecture (frozen probe)"] = probe_frozen(random_model.encoder(), dm, probe_epochs, seed)

    table = Table(title=f"digits, {len(dm.val_set)} held-out images, {dm.num_classes} classes, backbone {backbone}")
    table.add_column("encoder")
    table.add_column("top-1 %", justify="right")
    table.add_column("top-5 %", justify="right")
    for name, (t1, t5) in rows.items():
        table.add_row(name, f"{t1:.1f}", f"{t5:.1f}")
    console.print(table)
    result = {name: {"top1": t1, "top5": t5} for name, (t1, t5) in rows.items()}
    (run.run_dir / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"run directory: {run.run_dir} (encoder: {run.run_dir / 'export'}, results: demo.json)")
    return result
