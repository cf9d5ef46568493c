"""Pretext tasks as reusable pieces: each makes its inputs from a batch, owns its head, returns its loss.

A single-task method (``rotation``, ``colorization``, ...) is an :class:`~selfsup.ssl.module.SSLModule`
wrapping one :class:`Task`; ``multitask`` wraps several on one backbone and sums their losses
(Doersch & Zisserman 2017). A task never owns the backbone: it receives it on every call, so several
tasks share one.

- [0] Multi-task Self-Supervised Visual Learning, Doersch & Zisserman 2017, https://arxiv.org/abs/1708.07860
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from selfsup.ssl.module import SSLModule

TASKS: dict[str, type[Task]] = {}
"""Registered pretext tasks by name; ``multitask --tasks`` reads it."""


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a :class:`Task` subclass in :data:`TASKS` under ``name``."""

    def deco(cls: type[Task]) -> type[Task]:
        TASKS[name] = cls
        cls.task_name = name
        return cls

    return deco


class Task(nn.Module):
    """One pretext task over a shared backbone.

    Subclasses take ``num_features`` (the backbone's pooled width) and ``in_chans`` (the backbone's
    input channels) first, then their own keyword arguments (with defaults, so ``multitask`` can build
    them from the task name alone), and implement :meth:`forward`. A task that needs a lightness-only
    backbone sets ``in_chans = 1``; ``multitask`` then feeds every task lightness (the paper's
    "lightness only" input), which every other task accepts since ``prepare`` does the conversion.
    """

    task_name: str = ""
    in_chans: ClassVar[int] = 3
    """Backbone input channels the task needs: 1 for colorization (lightness in, colour out)."""
    whole_image_features: ClassVar[bool] = True
    """Whether the ``features`` it returns are pooled backbone features of whole images, as a plain
    encoder computes them; CPC's are means of patch vectors, which ``multitask``'s probe does not reuse."""
    batch_norm_ok: ClassVar[bool] = True
    """False for a task that batch norm lets cheat (CPC: statistics shared by the patches of one image);
    ``multitask`` warns when such a task gets a batch-norm backbone."""

    def forward(self, x: torch.Tensor, backbone: nn.Module, prepare: nn.Module) -> dict[str, torch.Tensor]:
        """The task's loss on a batch.

        Args:
            x: augmented RGB images ``(B, 3, H, W)``, float in [0, 1], on the device.
            backbone: the shared :class:`~selfsup.ssl.backbone.Backbone`.
            prepare: the input adapter, RGB in [0, 1] -> backbone input (normalised RGB, or lightness).

        Returns:
            A dict with a scalar ``loss``, other scalars to log (``<task>_acc``, ...) and optionally
            ``features``: detached pooled features ``(B, D)`` of the batch's images, in batch order.
        """
        raise NotImplementedError


class TaskMethod(SSLModule):
    """A method that is one :class:`Task` on the shared backbone (rotation, colorization, ...).

    A subclass builds ``self.task`` in its constructor; the loss is the task's on the augmented batch.
    """

    task: Task

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.task(self.augment(batch[0]), self.backbone, self.normalize)
