"""Pretext-task methods: rotation, colorization, relative position, jigsaw, exemplar and their multi-task combination.

Each task is a :class:`~selfsup.pretext.task.Task` (reusable by ``multitask``) wrapped by a method; CPC v2
(:mod:`selfsup.ssl.cpc`) is one too and is imported here, so that ``TASKS`` always has ``cpc``.
"""

from selfsup.pretext.colorization import Colorization, ColorizationTask
from selfsup.pretext.exemplar import Exemplar, ExemplarTask, triplet_loss
from selfsup.pretext.jigsaw import Jigsaw, JigsawTask, permutation_set
from selfsup.pretext.multitask import MultiTask
from selfsup.pretext.relative_position import RelativePosition, RelativePositionTask
from selfsup.pretext.rotation import Rotation, RotationTask, rotate_batch
from selfsup.pretext.task import TASKS, Task, register_task
from selfsup.ssl.cpc import CPC, CPCTask

__all__ = [
    "CPC",
    "TASKS",
    "CPCTask",
    "Colorization",
    "ColorizationTask",
    "Exemplar",
    "ExemplarTask",
    "Jigsaw",
    "JigsawTask",
    "MultiTask",
    "RelativePosition",
    "RelativePositionTask",
    "Rotation",
    "RotationTask",
    "Task",
    "permutation_set",
    "register_task",
    "rotate_batch",
    "triplet_loss",
]
