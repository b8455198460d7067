"""Single-process emulation of tensor parallelism: one thread per rank, an in-process all-reduce.

It runs the real model functions on each rank's shard (local head counts come from the shapes),
with `exit_tp` summing the ranks' partial outputs (row-parallel reduction) and `enter_tp` the
identity, as Megatron's f / g pair does in the forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import attrs
import torch


@attrs.define
class _Shared:
    size: int
    barrier: threading.Barrier
    slots: list


@attrs.define
class ThreadComm:
    tp_rank: int
    tp_size: int
    shared: _Shared

    def enter_tp(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def exit_tp(self, y: torch.Tensor) -> torch.Tensor:
        self.shared.slots[self.tp_rank] = y
        self.shared.barrier.wait()
        total = torch.stack(self.shared.slots).sum(0)
        self.shared.barrier.wait()  # nobody overwrites a slot before everyone has summed
        return total


def run_tp(size: int, fn: Callable[[int, ThreadComm], torch.Tensor]) -> list[torch.Tensor]:
    """Run `fn(rank, comm)` on `size` threads; returns each rank's output."""
    shared = _Shared(size=size, barrier=threading.Barrier(size, timeout=60), slots=[None] * size)
    out, errors = [None] * size, []

    def work(rank: int) -> None:
        try:
            out[rank] = fn(rank, ThreadComm(rank, size, shared))
        except BaseException as err:  # surfaced below, naming the rank
            errors.append((rank, err))
            shared.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        rank, err = errors[0]
        raise RuntimeError(f"TP rank {rank} failed: {err!r}") from err
    return out
