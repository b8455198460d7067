"""Hangs become errors that say who and where: a collective that times out names its operation and
the ranks that never joined it.

Every rank notes the operation it is about to wait in (`operation("gradient reduction (DP)")`) in
the job's key-value store (torchrun's TCPStore, served by a thread of rank 0, so it answers even
while rank 0's Python is busy). When a collective times out (`parallel.timeout_minutes`), the
timed-out rank records that, waits a moment for the others waiting in the same collective to do the
same, and raises `CollectiveTimeout` naming its operation and step and the ranks that did not time
out: those that stalled or never arrived, with the last operation each noted. One store write per
operation, a handful per step.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator

import torch.distributed as dist

from omnicore_dist.mesh import job_store

__all__ = ["CollectiveTimeout", "Board", "install", "operation", "explain_failures", "is_comm_failure"]

# What torch's backends say when a peer stalls or dies (gloo, NCCL, HCCL).
_COMM_FAILURE = re.compile(r"Timed out|timed out|Timeout|Connection closed by peer|Connection reset|Broken pipe|watchdog", re.IGNORECASE)
_SETTLE_SECONDS = 2.0  # how long a timed-out rank waits for the others' reports


class CollectiveTimeout(RuntimeError):
    """A collective operation did not complete: which, where, and which ranks never joined it."""


class Board:
    """This rank's entry in the store: its step, the operation it waits in, and whether it timed out."""

    def __init__(self, store, rank: int, world: int, timeout_s: float):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s
        self.step, self.what = 0, "start-up"

    def note(self, what: str, step: int | None = None) -> None:
        self.step = self.step if step is None else step
        self.what = what
        self._write({"step": self.step, "what": what, "at": time.time(), "timed_out": False})

    def _write(self, entry: dict) -> None:
        try:
            self.store.set(f"omnicore/progress/{self.rank}", json.dumps(entry))
        except Exception:  # a dead store (rank 0 gone) must not hide the original error
            pass

    def _read(self, rank: int) -> dict | None:
        try:
            return json.loads(self.store.get(f"omnicore/progress/{rank}"))
        except Exception:
            return None

    def explain(self, err: BaseException) -> CollectiveTimeout:
        """Record this rank's timeout, let the others record theirs, and name those who did not."""
        self._write({"step": self.step, "what": self.what, "at": time.time(), "timed_out": True})
        time.sleep(_SETTLE_SECONDS)
        missing = []
        for r in range(self.world):
            if r == self.rank:
                continue
            entry = self._read(r)
            if entry is None:
                missing.append(f"rank {r} (no report)")
            elif not entry["timed_out"]:
                ago = time.time() - entry["at"]
                missing.append(f"rank {r} (last at step {entry['step']}: {entry['what']}, {ago:.0f} s ago)")
        who = ("; not joined or stalled: " + ", ".join(missing)) if missing else "; every other rank timed out too (a lost peer)"
        backend = str(err).strip().splitlines()[0][:300]
        what = (f"did not complete within parallel.timeout_minutes ({self.timeout_s / 60:g} min)" if re.search(r"time", backend, re.IGNORECASE)
                else "failed: a peer left the job (crashed, killed or timed out itself)")  # fmt: skip
        return CollectiveTimeout(f"rank {self.rank}: {self.what} at step {self.step} {what}{who}. Backend: {backend}")


_BOARD: Board | None = None


def install(timeout_minutes: float) -> None:
    """Use the job's store for progress notes (a no-op in one process)."""
    global _BOARD
    if dist.is_initialized() and dist.get_world_size() > 1:
        _BOARD = Board(job_store(), dist.get_rank(), dist.get_world_size(), timeout_minutes * 60) if job_store() is not None else None
    else:
        _BOARD = None


def is_comm_failure(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and not isinstance(err, CollectiveTimeout) and bool(_COMM_FAILURE.search(str(err)))


@contextlib.contextmanager
def operation(what: str, step: int | None = None) -> Iterator[None]:
    """Note `what` before waiting in it; a backend timeout inside becomes a CollectiveTimeout."""
    if _BOARD is None:
        yield
        return
    _BOARD.note(what, step)
    try:
        yield
    except RuntimeError as err:
        if is_comm_failure(err):
            raise _BOARD.explain(err) from err
        raise


def explain_failures(err: BaseException) -> BaseException:
    """`err` as a CollectiveTimeout when it is a backend timeout outside any `operation` block."""
    return _BOARD.explain(err) if _BOARD is not None and is_comm_failure(err) else err
