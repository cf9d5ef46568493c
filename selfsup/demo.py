"""``selfsup demo``: rotation pretraining on the embedded digits, against the random-init floor.

Needs no files and no network: the data is scikit-learn's bundled handwritten digits. The demo
pretrains, then compares the pretrained encoder with a randomly initialised encoder of the same
architecture (and raw pixels) three ways: the online probe, a linear probe and kNN on cached
features, and a label-efficiency sweep (accuracy against labelled images per class) with its plot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and Lightning are imported when the demo runs, not when `selfsup --help` reads EPOCHS
    from torch import nn

    from selfsup.data.datamodule import SelfSupDataModule


def probe_frozen(encoder: nn.Module, dm: SelfSupDataModule, epochs: int, seed: int = 0) -> tuple[float, float]:
    """Top-1/top-5 (%) of the online probe trained for ``epochs`` on a frozen encoder's features."""
    import pytorch_lightning as pl

    from selfsup.eval.online import FrozenEncoder, OnlineLinearProbe
    from selfsup.quiet import quiet_lightning

    pl.seed_everything(seed, verbose=False)
    probe = OnlineLinearProbe(dm.num_classes, seed=seed)
    with quiet_lightning():
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
            callbacks=[probe], num_sanity_val_steps=0, check_val_every_n_epoch=epochs, enable_model_summary=False,
        )
        trainer.fit(FrozenEncoder(encoder), datamodule=dm)
    return probe.last_top1, probe.last_top5


DIGITS_CAVEAT = (
    "How to read it: the digits are 8x8 images that raw pixels already classify at about 97%, so this shows "
    "the pipeline working end to end, not what self-supervision buys on real images (see the README's Results). "
    "The online probe is a linear head trained alongside the pretraining (one small Adam step a batch, on augmented "
    "features of a changing encoder), so after a few epochs it reads below the linear probe, which is fitted to "
    "convergence on the frozen features."
)
EPOCHS = 5  # with SEEDS and KS: about a minute on 2 idle CPU cores (the README gives the measurement)
SEEDS = 2
KS = (1, 5, None)


def run_demo(
    epochs: int = EPOCHS,
    backbone: str = "convnet_small",
    output: str = "runs",
    seed: int = 0,
    seeds: int = SEEDS,
    ks: tuple = KS,
) -> dict:
    """Pretrain rotation on digits; print the comparison table and the sweep; return the numbers."""
    from rich.table import Table

    from selfsup.eval import harness
    from selfsup.eval.report import make_console
    from selfsup.train import pretrain

    console = make_console()
    console.print(f"[bold]selfsup demo[/]: rotation pretraining of {backbone} on the embedded digits ({epochs} epochs)")
    config = {
        "method": "rotation",
        "model": {"backbone": backbone, "lr": 0.05, "warmup_epochs": 2.0, "crop_scale": 0.7, "flip": False},
        "data": {"data": "digits", "batch_size": 128, "image_size": 16},
        "trainer": {"max_epochs": epochs, "log_every_n_steps": 5, "check_val_every_n_epoch": max(1, epochs // 4)},
        "seed": seed,
        "output": output,
    }
    run = pretrain(config)
    src = harness.resolve_source(str(run.run_dir))
    ev = harness.prepare(src)
    random_name = next(n for n in ev.features if n.startswith("random"))

    console.print("online probe of the random-init encoder (same epochs), linear probe and kNN on cached features")
    online = {src.name: run.probe.last_top1, random_name: probe_frozen(src.random_twin(), run.datamodule, epochs, seed)[0]}
    linear = harness.evaluate(ev, "probe")
    knn = harness.evaluate(ev, "knn")

    table = Table(title=f"digits: {len(ev.train)} train / {len(ev.test)} test images, backbone {backbone}; top-1 %")
    for col in ("encoder", "online probe", "linear probe", "kNN (k=20)"):
        table.add_column(col, justify="left" if col == "encoder" else "right")
    rows = {}
    for name in ev.features:
        rows[name] = {"online_top1": online.get(name), "linear_top1": linear[name]["top1"], "knn_top1": knn[name]["top1"]}
        table.add_row(name, *(("-" if v is None else f"{v:.1f}") for v in rows[name].values()))
    console.print(table)
    console.print(DIGITS_CAVEAT)

    sweep_json, sweep_png = harness.sweep(ev, src, ks=ks, seeds=list(range(seeds)))
    (run.run_dir / "demo.json").write_text(json.dumps(rows, indent=2) + "\n")
    console.print(final_line(run.run_dir, sweep_json, sweep_png), soft_wrap=True)
    return rows


def shown_path(path) -> str:
    """``path`` relative to the working directory when it lies under it, else absolute: one form for all."""
    full = Path(path).resolve()
    try:
        return str(full.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(full)


def final_line(run_dir, sweep_json, sweep_png) -> str:
    """The demo's last line: where everything it wrote is, every path in the same form (see :func:`shown_path`)."""
    run_dir = Path(run_dir)
    return (f"run directory: {shown_path(run_dir)} (encoder: {shown_path(run_dir / 'export')}, table: "
            f"{shown_path(run_dir / 'demo.json')}, sweep: {shown_path(sweep_json)}, plot: {shown_path(sweep_png)})")
