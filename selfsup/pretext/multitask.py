"""Multi-task self-supervision: several registered pretext tasks on one shared backbone, losses summed.

Every task of :data:`~selfsup.pretext.task.TASKS` named in ``tasks`` builds its own head with its
defaults and makes its own inputs from the same augmented batch; the backbone gets the weighted sum of
their losses. When any chosen task needs a lightness-only backbone (colorization), the backbone sees CIE
lightness for every task, the paper's "lightness only" input; the exported encoder still takes RGB.
The exported encoder pools the backbone over whole images, whichever tasks trained it (``cpc`` too).

- [0] Multi-task Self-Supervised Visual Learning, Doersch & Zisserman 2017, https://arxiv.org/abs/1708.07860
"""

from __future__ import annotations

import difflib

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from selfsup.errors import ConfigError
from selfsup.pretext.task import TASKS
from selfsup.ssl.module import SSLModule, register_method


def parse_tasks(tasks: str, task_weights: str | None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Validated task names and weights from comma-separated strings (weights default to 1 each)."""
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if not names:
        raise ConfigError(f"tasks must name at least one task from {sorted(TASKS)}, got {tasks!r}")
    for t in names:
        if t not in TASKS:
            close = difflib.get_close_matches(t, TASKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown task {t!r} in tasks={tasks!r}{hint}; known: {', '.join(sorted(TASKS))}")
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks must be distinct, got {tasks!r}")
    if task_weights is None:
        return names, (1.0,) * len(names)
    try:
        weights = tuple(float(w) for w in str(task_weights).split(","))
    except ValueError:
        raise ConfigError(f"task_weights must be comma-separated numbers, got {task_weights!r}") from None
    if len(weights) != len(names) or any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(
            f"task_weights must be {len(names)} non-negative numbers (one per task of {tasks!r}, not all 0), "
            f"got {task_weights!r}"
        )
    return names, weights


TASK_OPTIONS = {"cpc": {"gather_negatives": True}}
"""Options multitask gives a task beyond its defaults: under DDP, cpc's InfoNCE takes every rank's targets as
candidates, so a distributed step computes the single-process loss of the global batch (no-op in one process)."""


@register_method("multitask")
class MultiTask(SSLModule):
    """Several pretext tasks on one backbone, losses summed with weights (Doersch & Zisserman 2017).

    Logs ``train/<task>_loss`` and each task's own scalars (``train/<task>_acc``, ...) beside the
    weighted total ``train/loss``.

    Args:
        tasks: comma-separated registered pretext tasks, each with its default options, e.g.
            ``rotation,relative_position,colorization``. If any of them needs lightness input
            (colorization), the backbone is lightness-only and every task sees lightness (the
            paper's "lightness only" input); the exported encoder still takes RGB and converts it.
            ``cpc`` cuts its patch grid from the batch as it is (32 px: 8 px patches at stride 4), so
            the images must be square and at least a patch wide. CPC v2 needs a backbone without batch
            norm (the patches of one image share its statistics, a shortcut): with ``cpc`` on a
            batch-norm backbone (the default ``norm``) a warning at the start of training says to pass
            ``--norm layer``. The default stays the backbone's own, so that adding ``cpc`` never
            changes how the other tasks train.
        task_weights: comma-separated loss weights, one per task (e.g. ``1,1,0.5``); ``None``: all 1.
    """

    def __init__(self, *, tasks: str = "rotation,relative_position,jigsaw", task_weights: str | None = None,
                 **base) -> None:
        names, weights = parse_tasks(tasks, task_weights)
        in_chans = 1 if any(TASKS[t].in_chans == 1 for t in names) else 3
        super().__init__(**(self.base_defaults | base | {"in_chans": in_chans}))
        self.task_names, self.task_weights = names, weights
        self.tasks = nn.ModuleDict({t: TASKS[t](self.num_features, in_chans, **TASK_OPTIONS.get(t, {})) for t in names})

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # Warned when training starts, not at construction: load_encoder rebuilds the model to encode only.
        shunned = [t for t in self.task_names if not self.tasks[t].batch_norm_ok]
        if shunned and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.backbone.modules()):
            rank_zero_warn(
                f"multitask: task {', '.join(shunned)} on a batch-norm backbone lets the patches of one image "
                f"share batch statistics (a shortcut CPC v2 avoids with layer norm); pass --norm layer",
                category=UserWarning,
            )

    def loss(self, batch):
        x = self.augment(batch[0])  # (B, 3, H, W) in [0, 1], one augmented batch for every task
        total = torch.zeros((), device=x.device)
        logs: dict[str, torch.Tensor] = {}
        for (name, task), w in zip(self.tasks.items(), self.task_weights, strict=True):
            out = task(x, self.backbone, self.normalize)
            total = total + w * out["loss"]
            logs[f"{name}_loss"] = out["loss"].detach()
            for k, v in out.items():
                if k == "features":
                    if task.whole_image_features:  # what the encoder computes, so the online probe may reuse it
                        logs.setdefault("features", v)
                elif k != "loss" and v.ndim == 0:
                    logs[k if k.startswith(f"{name}_") else f"{name}_{k}"] = v.detach()
        return {"loss": total, **logs}
