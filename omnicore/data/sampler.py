"""Deterministic, resumable sample order: which samples each data-parallel rank trains on at each step.

Epoch e is a permutation of all samples drawn from a generator seeded with (seed, e), so the order
never depends on the number of workers, the machine or earlier epochs' progress. A global batch is
the next `global_batch` indices of that stream (crossing into the next epoch when one ends); DP rank
r takes the r-th contiguous slice, cut into micro-batches. The only state is the count of samples
consumed, so resuming from a saved position yields exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import attrs
import torch

__all__ = ["StepSampler"]


@attrs.frozen(kw_only=True)
class StepSampler:
    n_samples: int
    global_batch: int
    micro_batch: int
    dp_size: int = 1
    seed: int = 0
    shuffle: bool = True

    def __attrs_post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError("the dataset is empty")
        if self.global_batch % (self.micro_batch * self.dp_size):
            raise ValueError(
                f"global batch {self.global_batch} is not divisible by micro batch {self.micro_batch} "
                f"x data-parallel size {self.dp_size} = {self.micro_batch * self.dp_size}"
            )

    @property
    def micro_batches_per_rank(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_samples)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_samples, generator=gen)

    def global_indices(self, consumed: int) -> list[int]:
        """Sample indices of the global batch that starts after `consumed` samples."""
        out: list[int] = []
        position = consumed
        while len(out) < self.global_batch:
            epoch, offset = divmod(position, self.n_samples)
            take = self._epoch_order(epoch)[offset : offset + self.global_batch - len(out)]
            out += take.tolist()
            position += len(take)
        return out

    def rank_micro_batches(self, consumed: int, dp_rank: int) -> list[list[int]]:
        """The micro-batches (lists of sample indices) of `dp_rank` for the next global batch."""
        indices = self.global_indices(consumed)
        per_rank = self.global_batch // self.dp_size
        mine = indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        return [mine[i : i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]
