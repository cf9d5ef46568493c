"""One process's share of a data-parallel fit: its rank, the world size and a summing all-reduce.

The linear probe (:func:`selfsup.eval.linear.linear_probe`) takes a :class:`Shard`: each rank then reads
only its contiguous block of the training (and test) rows, and every sum over rows it computes (the
standardisation statistics, the loss and its gradient, hit counts) is summed over the ranks by
``all_reduce`` before it is used, so every rank sees the whole data set's numbers and takes the same
L-BFGS step. The default ``Shard()`` is one process: nothing is reduced, the code path is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from selfsup.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` processes, and the in-place sum over them (None: one process).

    Attributes:
        rank: this process's index, ``0 <= rank < world``.
        world: number of processes sharing the rows.
        all_reduce: sums a tensor in place over all ranks (every rank must call it, in the same order);
            every rank must receive the same bits (true of gloo's and NCCL's all-reduce).
    """

    rank: int = 0
    world: int = 1
    all_reduce: Callable[[torch.Tensor], None] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ConfigError(f"rank must lie in [0, world={self.world}), got {self.rank!r}")
        if self.world > 1 and self.all_reduce is None:
            raise ConfigError(f"a shard of world size {self.world} needs an all_reduce")

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's contiguous block ``[lo, hi)`` of ``n`` rows (sizes differ by at most one)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed in place over the ranks (untouched in one process); returns ``t``."""
        if self.world > 1:
            self.all_reduce(t)
        return t

    def total(self, count: int, device: torch.device | str = "cpu") -> int:
        """The sum of ``count`` over the ranks."""
        if self.world == 1:
            return count
        return int(self.sum_(torch.tensor([count], dtype=torch.float64, device=device)).item())

    @classmethod
    def process_group(cls, group=None) -> Shard:
        """The shard of this process in a ``torch.distributed`` group (the default one when None).

        One process (``Shard()``) when torch.distributed is not initialised. Under NCCL a CPU tensor is
        reduced through a copy on the current GPU.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        nccl = dist.get_backend(group) == "nccl"

        def all_reduce(t: torch.Tensor) -> None:
            if nccl and not t.is_cuda:
                on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM, group=group)
                t.copy_(on_gpu)
            else:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

        return cls(dist.get_rank(group), dist.get_world_size(group), all_reduce)
