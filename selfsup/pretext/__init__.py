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

# isort: split
# Last, and as a module: CPC imports pretext.task, so `import selfsup.ssl.cpc` may be what is importing this
# package (then cpc is not complete yet, and its names are read on use, below).
import selfsup.ssl.cpc  # noqa: E402


def __getattr__(name: str):
    if name in ("CPC", "CPCTask"):
        return getattr(selfsup.ssl.cpc, name)
    raise AttributeError(f"module 'selfsup.pretext' has no attribute {name!r}")

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
