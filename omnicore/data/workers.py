"""Worker processes for the data pipeline: an ordered map that survives a worker dying or hanging.

`worker_map(task, items, workers=n)` runs `task(item)` in `n` forked processes (0: in this one) and
yields the results in item order, at most `n * prefetch` items ahead. The cache build and the loader
use it. A segfault in a decoder or the OOM killer takes down one process, not the run: the pool is
replaced and the unfinished items are retried one per fresh process, so the item that kills its
process again is isolated and reported as `WorkerDied(item)`. With `timeout`, an item that takes
longer (a decoder stuck on a hostile file) is treated the same way: its pool's processes are killed,
it is retried alone with the same limit, and reported as `WorkerDied(item, "timed out ...")`.
Exceptions `task` raises propagate.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import attrs
import torch

__all__ = ["WorkerDied", "worker_map"]

_WORKER_TASK: Callable[[Any], Any] | None = None  # set once in each pool process by `_init_worker`; never in the parent


def _init_worker(task: Callable[[Any], Any]) -> None:
    global _WORKER_TASK
    torch.set_num_threads(1)  # as torch's DataLoader: workers share the cores, one thread each
    _WORKER_TASK = task


def _call(item: Any) -> Any:
    return _WORKER_TASK(item)


@attrs.frozen
class WorkerDied:
    """The outcome of an item whose worker process died (or overran the timeout) twice: once in
    the pool, once alone."""

    item: Any
    reason: str = "its worker process died"


def _pool(workers: int, task: Callable[[Any], Any]) -> ProcessPoolExecutor:
    # fork: the task (the cache's open files, conversations, tokenizer) reaches workers without pickling.
    # The tokenizer's thread pool does not survive a fork; say so up front instead of a warning per worker.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    context = multiprocessing.get_context("fork")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(task,))


def _kill(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's processes (one is stuck): the executor has no public way before Python 3.14."""
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()


def _alone(task: Callable[[Any], Any], item: Any, timeout: float | None = None) -> Any:
    """`task(item)` in a fresh single process; `WorkerDied(item)` if that process dies or overruns too."""
    pool = _pool(1, task)
    try:
        return pool.submit(_call, item).result(timeout=timeout)
    except BrokenProcessPool:
        return WorkerDied(item)
    except FutureTimeout:
        _kill(pool)
        return WorkerDied(item, f"timed out after {timeout:g} s")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def worker_map(task: Callable[[Any], Any], items: Iterable[Any], *, workers: int, prefetch: int = 2,
               timeout: float | None = None) -> Iterator[Any]:  # fmt: skip
    """`task(item)` for each item, in item order, run `workers` processes wide (0: in this process).

    At most `workers * prefetch` items are in flight. When a worker process dies (a segfault in a
    decoder, the OOM killer), the pool is replaced and each unfinished item is retried alone in a
    fresh process: an item that kills that one too yields `WorkerDied(item)`, the others their
    results, so one poisonous item never stops the stream. `timeout` (seconds, worker processes
    only) bounds the wait for the oldest item the same way. Exceptions raised by `task` propagate.
    """
    if workers == 0:
        yield from map(task, items)
        return
    items, end = iter(items), object()
    while True:
        pool, pending = _pool(workers, task), deque()
        try:
            while True:
                while len(pending) < workers * prefetch and (item := next(items, end)) is not end:
                    pending.append((item, pool.submit(_call, item)))
                if not pending:
                    return
                try:
                    result = pending[0][1].result(timeout=timeout)
                except BrokenProcessPool:
                    break
                except FutureTimeout:
                    _kill(pool)
                    break
                pending.popleft()
                yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for item, future in pending:  # in order; then a new pool takes the rest
            finished = future.done() and not future.cancelled() and future.exception() is None
            yield future.result() if finished else _alone(task, item, timeout)
