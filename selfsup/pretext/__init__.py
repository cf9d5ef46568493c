"""Pretext-task methods: rotation (and, as they land, colorization, relative position, jigsaw, multitask).

Each task is a :class:`~selfsup.pretext.task.Task` (reusable by ``multitask``) wrapped by a method.
"""

from selfsup.pretext.colorization import Colorization, ColorizationTask  # noqa: F401  (registers colorization)
from selfsup.pretext.rotation import Rotation, RotationTask, rotate_batch
from selfsup.pretext.task import TASKS, Task, register_task

__all__ = ["TASKS", "Rotation", "RotationTask", "Task", "register_task", "rotate_batch"]
