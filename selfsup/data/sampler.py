"""A shuffling sampler and loader that resume mid-epoch at the next unseen batch.

The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone (never from the global RNG),
split over DDP ranks as :class:`~torch.utils.data.DistributedSampler` does, so a resumed run sees the
same batches in the same order as the uninterrupted one. :class:`ResumableLoader` implements
Lightning's ``state_dict`` / ``load_state_dict`` dataloader protocol: Lightning stores the loader's
position in every checkpoint and, on a mid-epoch restart, the next epoch iteration skips the batches
already trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler


class SampleIndex(int):
    """A dataset index that also says which epoch drew it (datasets that crop in the loader seed by it)."""

    epoch: int = 0

    def __new__(cls, index: int, epoch: int) -> SampleIndex:
        obj = super().__new__(cls, index)
        obj.epoch = int(epoch)
        return obj

    def __reduce__(self):  # to DataLoader workers and back, with the epoch
        return SampleIndex, (int(self), self.epoch)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seed + epoch permutation, rank split) that can start ``skip`` samples in.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas, rank: DDP world size and this process's rank (1 and 0 for one process).
        shuffle: permute each epoch.
        seed: the permutation of epoch ``e`` is ``randperm(n, generator=seed + e)``.
        drop_last: when ``n`` is not a multiple of the ranks, leave out the permutation's last
            ``n mod ranks`` samples (other ones each epoch) instead of repeating its first ones, so no
            sample is read twice in an epoch (shards do this).
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._skip_epoch: int | None = None
        self._skip = 0

    def skip_next(self, epoch: int, samples: int) -> None:
        """Make the iteration of ``epoch`` start after its first ``samples`` indices (once)."""
        self._skip_epoch, self._skip = epoch, max(0, int(samples))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._skip_epoch == self.epoch and self._skip:
            indices = indices[self._skip :]
        self._skip_epoch, self._skip = None, 0
        return iter([SampleIndex(i, self.epoch) for i in indices])


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position Lightning saves in checkpoints.

    ``progress`` returns how many batches of the current epoch have been trained on (Lightning's
    ``batch_progress``); without it (outside a Trainer) the state records the epoch only.
    """

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableLoader needs a ResumableSampler, got {type(self.sampler).__name__}")
        self.progress = progress

    def state_dict(self) -> dict:
        batches = int(self.progress()) if self.progress is not None else 0
        return {"epoch": int(self.sampler.epoch), "batches": batches, "batch_size": int(self.batch_size or 1)}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state.get("batches", 0))
        # Lightning creates the resumed epoch's iterator before it sets the sampler's epoch, and loader
        # workers start reading at once (iterating the sampler): set the epoch here, or they would read
        # epoch 0's order. A finished epoch needs no skipping: the next one starts afresh.
        self.sampler.set_epoch(epoch + 1 if batches >= len(self) else epoch)
        if 0 < batches < len(self):
            self.sampler.skip_next(epoch, batches * int(state.get("batch_size", self.batch_size)))


def loader_generator(seed: int) -> torch.Generator:
    """A generator for a DataLoader's worker base seed, so iterating never draws from the global RNG."""
    return torch.Generator().manual_seed(int(seed))
