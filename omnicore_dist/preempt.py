"""Preemption: SIGTERM ends a run cleanly, at a step boundary, with a checkpoint of that step.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM and wait a grace period before SIGKILL.
The handler only sets a flag; after each step every rank reports its flag and the job agrees on the
maximum (one scalar all-reduce), so all ranks stop after the same step even when the signal reached
them at different moments. The run then saves that step through the ordinary atomic save and exits 0.
A second SIGTERM during that save only sets the flag again: nothing interrupts the save, and the
previous checkpoint stays the tracked one until the new one is committed.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

__all__ = ["Preemption"]


class Preemption:
    """The SIGTERM flag of one run: `install()` sets the handler (main thread only; elsewhere, as in
    a test calling `run` from a worker thread, there is no handler and never a request), `close()`
    puts the previous handler back."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous: dict[signal.Signals, object] = {}

    @classmethod
    def install(cls, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> Preemption:
        self = cls(signals)
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.requested = True

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self, world: int, device: torch.device) -> bool:
        """Whether any rank was asked to stop. Collective over the whole job when `world` > 1."""
        flag = torch.tensor([float(self.requested)], device=device)
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
