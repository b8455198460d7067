"""The training loader: each step's micro-batches for one data-parallel rank, prefetched by worker processes.

Order is `StepSampler`'s (a permutation per epoch seeded by (seed, epoch); DP rank r takes the r-th
slice of each global batch), so the only state is the number of samples consumed: `steps(consumed)`
started from a saved position yields exactly the batches the uninterrupted run would, whatever the
number of workers. Micro-batches are collated packed (`cu_seqlens`, positions restart per sample) or
padded, in the workers.

Token budget (`max_tokens`): the rank's share of a global batch (`global_batch / dp` samples, in
sampler order) is cut greedily: a sample joins the current micro-batch while the micro-batch's size
stays within the budget, otherwise it starts the next one; a sample over the budget on its own is a
micro-batch by itself (never cut). Size is the sum of tokens when packed, count x longest when padded.
Micro-batches never span steps, so the number of samples per step, the saved position and resume are
unchanged; only the number of micro-batches varies by step and rank (the train step's collectives
are per step, not per micro-batch).

A sample that cannot be loaded never stops the run: a corrupt cache entry is named and processed again
from its conversation (or dropped when that fails); an unreadable one is dropped; a sample whose worker
process dies is isolated (its micro-batch retried one sample per process) and dropped. Each is counted
in `stats` ("repaired: ...", "dropped: ...") and named in the step's `problems`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import attrs
import torch

from omnicore.data.cache import CorruptEntry
from omnicore.data.collate import collate_packed, collate_padded, sample_tokens
from omnicore.data.errors import DataStats
from omnicore.data.sampler import StepSampler
from omnicore.data.workers import WorkerDied, worker_map

__all__ = ["SampleSource", "MemorySamples", "StepBatch", "Loader", "group_by_tokens", "step_plan", "load_micro_batches"]


class SampleSource(Protocol):
    """What the loader reads: `SampleCache`, or `MemorySamples`. A source whose `load` raises
    `CorruptEntry` (only the cache does) also has `rebuild(i)`, which the loader tries next."""

    def __len__(self) -> int: ...

    def tokens(self, i: int) -> int: ...

    def load(self, i: int) -> dict[str, torch.Tensor]: ...

    def describe(self, i: int) -> str: ...


@attrs.frozen
class MemorySamples:
    """Processed samples already in memory (collate's format), e.g. those a test passes to `run`."""

    samples: Sequence[Mapping[str, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.samples)

    def tokens(self, i: int) -> int:
        return sample_tokens(self.samples[i])

    def load(self, i: int) -> dict[str, torch.Tensor]:
        return dict(self.samples[i])

    def describe(self, i: int) -> str:
        return f"sample {i}"


def group_by_tokens(indices: Sequence[int], lengths: Sequence[int], max_tokens: int, *, padded: bool = False) -> list[list[int]]:
    """Greedy, order-keeping micro-batches within `max_tokens` (the module docstring's rule).

    `lengths[k]` is the token count of `indices[k]`; size is sum(lengths) packed, count x max padded.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for index, n in zip(indices, lengths):
        size = (len(current) + 1) * max(longest, n) if padded else total + n
        if current and size > max_tokens:
            groups.append(current)
            current, longest, total = [], 0, 0
        current.append(index)
        longest, total = max(longest, n), total + n
    if current:
        groups.append(current)
    return groups


def step_plan(sampler: StepSampler, consumed: int, dp_rank: int, source: SampleSource, *,
              max_tokens: int | None = None, padded: bool = False) -> list[list[int]]:  # fmt: skip
    """Rank `dp_rank`'s micro-batches (sample indices) of the step that starts after `consumed` samples."""
    micro = sampler.rank_micro_batches(consumed, dp_rank)
    if max_tokens is None:
        return micro
    mine = [i for mb in micro for i in mb]
    return group_by_tokens(mine, [source.tokens(i) for i in mine], max_tokens, padded=padded)


@attrs.frozen
class StepBatch:
    """One step of one rank: the position it starts at, its collated micro-batches, and each sample
    of it that was repaired or dropped, named."""

    consumed: int  # samples consumed before this step: the position to save / resume from
    micro_batches: list[dict[str, torch.Tensor]]
    problems: tuple[str, ...] = ()


@attrs.frozen
class _Item:
    """One unit of work: micro-batch `index` of `count` in the step starting at `consumed`."""

    consumed: int
    index: int
    count: int
    samples: tuple[int, ...]


class _LoadTask:
    """Load (and collate) in a worker. Item -> (item, batch or None, events); an int -> one sample."""

    def __init__(self, source: SampleSource, packing: bool, pad_id: int):
        self.source, self.packing, self.pad_id = source, packing, pad_id

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        if not samples:
            return None
        return collate_packed(samples) if self.packing else collate_padded(samples, pad_id=self.pad_id)

    def one(self, i: int) -> tuple[dict[str, torch.Tensor] | None, list[tuple[str, str]]]:
        """Sample `i` and what happened to it: [(stats key, message)]."""
        try:
            return self.source.load(i), []
        except CorruptEntry as e:
            try:
                return self.source.rebuild(i), [("repaired: corrupt cache entry", f"{e}; processed again from its record")]
            except Exception as err:  # the record itself no longer processes: drop the sample
                return None, [("dropped: corrupt cache entry", f"{e}; processing it again failed: {err}")]
        except Exception as e:  # whatever breaks reading one sample drops that sample, not the run
            return None, [("dropped: unreadable sample", f"{self.source.describe(i)}: {type(e).__name__}: {e}")]

    def __call__(self, item: _Item | int) -> Any:
        if isinstance(item, int):
            return self.one(item)
        loaded = [self.one(i) for i in item.samples]
        return item, self.collate([s for s, _ in loaded if s is not None]), [e for _, events in loaded for e in events]


def load_micro_batches(source: SampleSource, groups: Sequence[Sequence[int]], *, stats: DataStats | None = None,
                       packing: bool = True, pad_id: int = 0) -> Iterator[tuple[dict[str, torch.Tensor] | None, tuple[str, ...]]]:  # fmt: skip
    """Collate each group of sample indices in this process (validation, tools), with the training
    loader's handling of bad samples: (micro-batch or None when every sample was dropped, problems)."""
    task = _LoadTask(source, packing, pad_id)
    for group in groups:
        loaded = [task.one(i) for i in group]
        problems = []
        for _, events in loaded:
            for key, message in events:
                if stats is not None:
                    stats.count(key)
                problems.append(message)
        yield task.collate([s for s, _ in loaded if s is not None]), tuple(problems)


class Loader:
    """Steps of micro-batches for `dp_rank` from a `SampleSource`, in `sampler`'s order.

    `num_workers` processes (0: this process) load and collate up to `num_workers * prefetch`
    micro-batches ahead. Runtime events (repaired / dropped samples) are counted in `stats`.

        loader = Loader(cache, StepSampler(n_samples=len(cache), global_batch=8, micro_batch=2, dp_size=2),
                        dp_rank=rank, num_workers=2)
        for step in loader.steps(consumed):      # endless; stop when training stops
            train_step(..., step.micro_batches)
    """

    def __init__(self, source: SampleSource, sampler: StepSampler, *, dp_rank: int = 0, num_workers: int = 0,
                 prefetch: int = 2, packing: bool = True, pad_id: int = 0, max_tokens: int | None = None,
                 stats: DataStats | None = None):  # fmt: skip
        if sampler.n_samples != len(source):
            raise ValueError(f"the sampler covers {sampler.n_samples} samples, the source holds {len(source)}")
        if not 0 <= dp_rank < sampler.dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside the data-parallel size {sampler.dp_size}")
        if num_workers < 0 or prefetch < 1 or (max_tokens is not None and max_tokens < 1):
            raise ValueError(f"need num_workers >= 0, prefetch >= 1, max_tokens >= 1 or None; got {num_workers}, {prefetch}, {max_tokens}")
        self.source, self.sampler, self.dp_rank = source, sampler, dp_rank
        self.num_workers, self.prefetch, self.max_tokens = num_workers, prefetch, max_tokens
        self.stats = stats if stats is not None else DataStats()
        self._task = _LoadTask(source, packing, pad_id)

    def plan(self, consumed: int) -> list[list[int]]:
        """This rank's micro-batches (sample indices) of the step starting after `consumed` samples."""
        padded = not self._task.packing
        return step_plan(self.sampler, consumed, self.dp_rank, self.source, max_tokens=self.max_tokens, padded=padded)

    def _items(self, consumed: int) -> Iterator[_Item]:
        while True:
            plan = self.plan(consumed)
            for j, samples in enumerate(plan):
                yield _Item(consumed, j, len(plan), tuple(samples))
            consumed += self.sampler.global_batch

    def _isolate(self, item: _Item) -> tuple[dict[str, torch.Tensor] | None, list[tuple[str, str]]]:
        """A micro-batch whose worker died: each sample alone, in its own process when one dies."""
        samples, events = [], []
        for i, outcome in zip(item.samples, worker_map(self._task, item.samples, workers=1, prefetch=1)):
            if isinstance(outcome, WorkerDied):
                events.append(("dropped: worker crashed", f"{self.source.describe(i)}: its worker process died loading it"))
                continue
            sample, more = outcome
            events += more
            samples += [sample] if sample is not None else []
        return self._task.collate(samples), events

    def steps(self, consumed: int = 0) -> Iterator[StepBatch]:
        """Steps from the position `consumed` (a multiple of the global batch) on, without end."""
        if consumed % self.sampler.global_batch:
            raise ValueError(f"position {consumed} is not a multiple of the global batch {self.sampler.global_batch}")
        batches: list[dict[str, torch.Tensor]] = []
        problems: list[str] = []
        for outcome in worker_map(self._task, self._items(consumed), workers=self.num_workers, prefetch=self.prefetch):
            if isinstance(outcome, WorkerDied):
                item, (batch, events) = outcome.item, self._isolate(outcome.item)
            else:
                item, batch, events = outcome
            for key, message in events:
                self.stats.count(key)
                problems.append(message)
            batches += [batch] if batch is not None else []
            if item.index == item.count - 1:
                yield StepBatch(item.consumed, batches, tuple(problems))
                batches, problems = [], []
