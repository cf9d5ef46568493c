"""Cost of one training step of each pretext task, relative to the backbone's forward + backward on the images.

For a batch of ``B`` square images, times (median over repeats, after warm-up) one optimisation step
of every registered pretext task on a shared backbone (the task makes its inputs, runs the backbone
and its head, backward, optimiser step) and of ``multitask`` over all of them, against the plain
backbone forward + backward + step on the same ``B`` images. Also counts the pixels each task sends
through the backbone per image, counted at its first convolution (rotation: 4 whole images; relative
position: 2 tiles, jigsaw: 9 tiles, each upsampled to at least 16 px; CPC: its 7x7 grid of patches),
which is what a convolutional backbone's FLOPs scale with. The steps are timed interleaved (one of each
per round) and each ratio is the median of the per-round ratios.

    python benchmarks/pretext_cost.py --preset cpu   # convnet_small, 32 px, batch 64, 1 thread

Writes ``benchmarks/results/pretext_cost.json`` and prints a rich table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfsup.pretext.multitask import MultiTask  # noqa: E402
from selfsup.pretext.task import TASKS  # noqa: E402

PRESETS = {
    "cpu": {"backbone": "convnet_small", "image_size": 32, "batch": 64, "repeats": 7, "threads": 1},
    "gpu": {"backbone": "cifar_resnet18", "image_size": 32, "batch": 256, "repeats": 20, "threads": None},
}


class _Backbone(torch.nn.Module):
    """The baseline: whole images through the backbone, a linear head, cross-entropy."""

    def __init__(self, model: MultiTask) -> None:
        super().__init__()
        self.head = torch.nn.Linear(model.num_features, 10)

    def forward(self, x, backbone, prepare):
        return {"loss": self.head(backbone(prepare(x))).logsumexp(1).mean()}


class _Method(torch.nn.Module):
    """A whole method's loss (``multitask``: its augmentation, then every task) in the task call shape."""

    def __init__(self, model: MultiTask) -> None:
        super().__init__()
        self.model = [model]  # not a submodule: its parameters are the optimiser's already

    def forward(self, x, backbone, prepare):
        return self.model[0].loss((x, None))


class _Step:
    """One task's optimisation step on a fixed batch, and the pixels it sends through the backbone per image."""

    def __init__(self, model: MultiTask, task: torch.nn.Module, x: torch.Tensor) -> None:
        self.model, self.task, self.x = model, task, x
        self.opt = model.build_optimizer(list(model.parameters()) + list(task.parameters()))
        seen = []
        # the backbone's first convolution: every way into the backbone (forward, forward_features) passes it
        first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        hook = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
        self()
        hook.remove()
        self.pixels = sum(s[0] * s[-1] * s[-2] for s in seen) // x.shape[0]  # (N, C, H, W) inputs per image

    def __call__(self) -> float:
        if self.x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = self.task(self.x, self.model.backbone, self.model.normalize)["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--backbone", help="override the preset's backbone")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pretext_cost.json"))
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    if args.backbone:
        p["backbone"] = args.backbone
    if p["threads"]:
        torch.set_num_threads(p["threads"])
    device = "cuda" if args.preset == "gpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.rand(p["batch"], 3, p["image_size"], p["image_size"], device=device)
    names = sorted(TASKS)
    steps = {}
    for name in ["backbone", *names, "multitask"]:
        tasks = ",".join(names) if name == "multitask" else ("rotation" if name == "backbone" else name)
        model = MultiTask(backbone=p["backbone"], tasks=tasks).to(device).train()
        if name == "backbone":  # an RGB backbone, as every task but colorization (and multitask with it) has
            task = _Backbone(model).to(device)
        else:
            task = _Method(model) if name == "multitask" else model.tasks[name]
        steps[name] = _Step(model, task, x)  # the first (warm-up) step counts the backbone's pixels
        steps[name]()  # a second warm-up step
    # interleaved: every round times one step of each, so a change of the machine's load hits all alike
    times = {name: [] for name in steps}
    for _ in range(p["repeats"]):
        for name, step in steps.items():
            times[name].append(step())
    rows = []
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["backbone"], strict=True)]
        rows.append({"task": name, "seconds": statistics.median(ts), "relative": statistics.median(ratios),
                     "backbone_pixels_per_image": steps[name].pixels})

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{p['backbone']}, {p['image_size']} px, batch {p['batch']}, {device}: one training step")
    for col in ("task", "ms / step", "x backbone fwd+bwd", "backbone px / image"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["task"], f"{1000 * r['seconds']:.1f}", f"{r['relative']:.2f}", str(r["backbone_pixels_per_image"]))
    Console().print(table)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if device == "cuda" else None, "loadavg": os.getloadavg()},
        "preset": p, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
