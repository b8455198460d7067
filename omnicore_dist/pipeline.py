"""Pipeline parallelism's moving parts: point-to-point payloads, the schedules, and one stage's executor.

A payload is a dict of named tensors (the model's carry and the inputs' metadata, DESIGN.md section 5).
Micro-batches differ in length, so every payload travels as a fixed-size int64 header (names, dtypes,
shapes, which tensors take a gradient) and then its tensors; the receiver allocates from the header.
Each exchange posts all its sends and receives at once and waits for them together, so a stage that
sends to its neighbour while that neighbour sends back (1F1B's steady state) cannot deadlock.

Schedules are pure event lists, ("F", i) / ("B", i): GPipe runs every forward, then every backward;
1F1B runs p - s - 1 warm-up forwards on stage s of p, then alternates one forward and one backward,
then drains the rest, so at most p - s micro-batches are in flight. `StageExecutor` runs the list
with Megatron's pairing of sends and receives and records what happened (events, micro-batches in
flight, busy seconds), which the tests compare with the list and the logs turn into a bubble fraction.
Stage outputs are freed right after they are sent (only their autograd history is kept for backward).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import attrs
import torch
import torch.distributed as dist
from torch.autograd.variable import Variable

from omnicore.layout import Stage
from omnicore_dist.mesh import Mesh

__all__ = ["PAYLOAD_NAMES", "P2P", "schedule_events", "StageExecutor", "StageTrace", "SCHEDULES", "stage_lines", "StageTimes", "log_stage_times"]

SCHEDULES = ("1f1b", "gpipe")
_MEDIA_KINDS = ("audio", "image", "video")
# Every name a payload may carry (the header stores an index into this tuple).
PAYLOAD_NAMES = (
    ("hidden", "objective", "input_ids", "positions", "cu_seqlens", "targets")
    + tuple(f"{k}_{part}" for k in _MEDIA_KINDS for part in ("values", "states", "features", "sizes"))
)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool, torch.uint8)
_MAX_DIMS = 4
_ENTRY = 4 + _MAX_DIMS  # name, dtype, requires_grad, ndim, dims
_HEADER = 1 + len(PAYLOAD_NAMES) * _ENTRY


def _header(payload: Mapping[str, torch.Tensor], device) -> torch.Tensor:
    head = torch.zeros(_HEADER, dtype=torch.int64)
    head[0] = len(payload)
    for j, (name, t) in enumerate(payload.items()):
        if t.dim() > _MAX_DIMS:
            raise ValueError(f"pipeline payload {name!r} has {t.dim()} dimensions; at most {_MAX_DIMS} travel")
        row = [PAYLOAD_NAMES.index(name), _DTYPES.index(t.dtype), int(t.requires_grad), t.dim(), *t.shape]
        head[1 + j * _ENTRY : 1 + j * _ENTRY + len(row)] = torch.tensor(row)
    return head.to(device)


def _parse(head: torch.Tensor) -> list[tuple[str, torch.dtype, bool, tuple[int, ...]]]:
    values = head.tolist()
    out = []
    for j in range(values[0]):
        name, dtype, grad, ndim, *dims = values[1 + j * _ENTRY : 1 + (j + 1) * _ENTRY]
        out.append((PAYLOAD_NAMES[name], _DTYPES[dtype], bool(grad), tuple(dims[:ndim])))
    return out


class P2P:
    """Payload exchange with this rank's neighbours in its pipeline (same DP and TP rank)."""

    def __init__(self, mesh: Mesh, device: torch.device):
        self.group, self.device = mesh.pp_group, device
        step = mesh.dp * mesh.tp
        self.stage, self.stages = mesh.pp_rank, mesh.pp
        self.prev = mesh.rank - step if self.stage > 0 else None
        self.next = mesh.rank + step if self.stage < mesh.pp - 1 else None
        self.first_rank = mesh.rank - self.stage * step
        self.last_rank = self.first_rank + (mesh.pp - 1) * step

    def exchange(self, *, to_prev: Mapping | None = None, to_next: Mapping | None = None, from_prev: bool = False,
                 from_next: bool = False) -> tuple[dict | None, dict | None]:  # fmt: skip
        """Send and receive in one go: headers first (all posted, then awaited), then tensors.
        Returns (payload from prev, payload from next), None where nothing was asked for."""
        sends = [(peer, dict(p)) for peer, p in ((self.prev, to_prev), (self.next, to_next)) if p is not None]
        recvs = [peer for peer, wanted in ((self.prev, from_prev), (self.next, from_next)) if wanted]
        if None in (p for p, _ in sends) or None in recvs:
            raise RuntimeError(f"pipeline stage {self.stage} has no neighbour in that direction")
        heads = {peer: torch.empty(_HEADER, dtype=torch.int64, device=self.device) for peer in recvs}
        self._run([(dist.isend, _header(p, self.device), peer) for peer, p in sends] + [(dist.irecv, heads[peer], peer) for peer in recvs])
        got: dict[int, dict[str, torch.Tensor]] = {}
        ops = []
        for peer in recvs:
            got[peer] = {}
            for name, dtype, grad, shape in _parse(heads[peer]):
                t = torch.empty(shape, dtype=dtype, device=self.device)
                got[peer][name] = t
                if t.numel():
                    ops.append((dist.irecv, t, peer))
                t.requires_grad_(grad)
        for peer, payload in sends:
            ops += [(dist.isend, t.detach().contiguous(), peer) for t in payload.values() if t.numel()]
        self._run(ops)
        return (got.get(self.prev) if from_prev else None), (got.get(self.next) if from_next else None)

    def _run(self, ops: list) -> None:
        """Post every (isend / irecv, tensor, peer) together and wait for all: one batch, so NCCL /
        HCCL run a stage's send and receive with the same neighbour concurrently instead of in order."""
        if ops:
            for work in dist.batch_isend_irecv([dist.P2POp(op, t, peer, group=self.group) for op, t, peer in ops]):
                work.wait()

    def broadcast_from_first(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, self.first_rank, group=self.group)
        return t

    def broadcast_from_last(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, self.last_rank, group=self.group)
        return t


def schedule_events(kind: str, stages: int, stage: int, micro: int) -> list[tuple[str, int]]:
    """The order of forward ("F", i) and backward ("B", i) work of `stage` (0-based) of `stages`."""
    if kind not in SCHEDULES:
        raise ValueError(f"pipeline schedule {kind!r}: choose from {', '.join(SCHEDULES)}")
    if kind == "gpipe":
        return [("F", i) for i in range(micro)] + [("B", i) for i in range(micro)]
    warmup = min(stages - stage - 1, micro)
    events = [("F", i) for i in range(warmup)]
    for j in range(micro - warmup):
        events += [("F", warmup + j), ("B", j)]
    return events + [("B", i) for i in range(micro - warmup, micro)]


@attrs.define
class StageTrace:
    """What one stage did in one step: its events in order, the most micro-batches in flight
    (forwarded, not yet backwarded), seconds computing and seconds overall."""

    events: list = attrs.Factory(list)
    max_in_flight: int = 0
    busy_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def bubble(self) -> float:
        return max(0.0, 1.0 - self.busy_seconds / self.total_seconds) if self.total_seconds > 0 else 0.0


def _free(t: torch.Tensor) -> None:
    """Drop a sent output's storage but keep its autograd history (Megatron's trick): backward
    needs only the graph, and this stage never reads the values again. (A saved-tensor hook that
    keeps the very object it is given would see the freed storage: such hooks must store a detach.)"""
    if t.grad_fn is not None and t._base is None:
        t.data = torch.empty((1,), dtype=t.dtype, device=t.device)


class StageExecutor:
    """Runs one step's schedule on one stage.

    `forward(i, payload)` takes micro-batch i's received payload (empty on the first stage) and
    returns what to send on, or on the last stage a 0-d tensor to backpropagate (the micro-batch's
    share of the loss). Backward runs autograd from this stage's outputs with the gradients the
    next stage returns, and sends the gradients of the received tensors back.
    """

    def __init__(self, p2p: P2P, forward: Callable[[int, dict], dict | torch.Tensor], *, after_backward: Callable[[], None] = lambda: None):
        self.p2p, self.forward_fn, self.after_backward = p2p, forward, after_backward
        self.first, self.last = p2p.stage == 0, p2p.stage == p2p.stages - 1

    def run(self, kind: str, micro: int) -> StageTrace:
        self.trace, self.saved = StageTrace(), {}
        started = time.perf_counter()
        (self._gpipe if kind == "gpipe" else self._one_f_one_b)(micro)
        self.trace.total_seconds = time.perf_counter() - started
        if self.saved:
            raise RuntimeError(f"pipeline stage {self.p2p.stage}: micro-batches {sorted(self.saved)} never ran backward")
        return self.trace

    def forward_only(self, micro: int) -> None:
        """Every micro-batch forward, nothing kept for backward (evaluation)."""
        with torch.no_grad():
            for i in range(micro):
                out = self.forward_fn(i, self._recv_forward() or {})
                if not self.last:
                    self.p2p.exchange(to_next=out)

    # Megatron's non-interleaved schedules: every send is paired with the receive that follows it.
    def _gpipe(self, micro: int) -> None:
        for i in range(micro):
            self._send_forward(self._forward(i, self._recv_forward()))
        for i in range(micro):
            self._send_backward(self._backward(i, self._recv_backward()))

    def _one_f_one_b(self, micro: int) -> None:
        warmup = min(self.p2p.stages - self.p2p.stage - 1, micro)
        steady = micro - warmup
        for i in range(warmup):
            self._send_forward(self._forward(i, self._recv_forward()))
        received = self._recv_forward() if steady else None
        for j in range(steady):
            out = self._forward(warmup + j, received)
            grads = self._send_forward_recv_backward(out)
            back = self._backward(j, grads)
            if j == steady - 1:
                self._send_backward(back)
            else:
                received = self._send_backward_recv_forward(back)
        for i in range(steady, micro):
            self._send_backward(self._backward(i, self._recv_backward()))

    def _forward(self, i: int, received: dict | None) -> dict | None:
        began = time.perf_counter()
        received = received or {}
        out = self.forward_fn(i, received)
        self.saved[i] = (received, out)
        self.trace.events.append(("F", i))
        self.trace.max_in_flight = max(self.trace.max_in_flight, len(self.saved))
        self.trace.busy_seconds += time.perf_counter() - began
        return None if self.last else out

    def _backward(self, i: int, grads: dict | None) -> dict | None:
        began = time.perf_counter()
        received, out = self.saved.pop(i)
        if self.last:
            if out.requires_grad:
                out.backward()
        else:
            names = [k for k, v in out.items() if v.requires_grad and grads and k in grads]
            if names:  # bypasses the shape check: sent outputs no longer hold their values
                Variable._execution_engine.run_backward(
                    tuple(out[k] for k in names), tuple(grads[k] for k in names), False, False, (), True, True
                )  # fmt: skip
        self.after_backward()
        back = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in received.items() if v.requires_grad}
        self.trace.events.append(("B", i))
        self.trace.busy_seconds += time.perf_counter() - began
        return None if self.first else back

    def _recv_forward(self) -> dict | None:
        return None if self.first else self.p2p.exchange(from_prev=True)[0]

    def _send_forward(self, out: dict | None) -> None:
        if not self.last:
            self.p2p.exchange(to_next=out)
            _free_all(out)

    def _recv_backward(self) -> dict | None:
        return None if self.last else self.p2p.exchange(from_next=True)[1]

    def _send_backward(self, back: dict | None) -> None:
        if not self.first:
            self.p2p.exchange(to_prev=back)

    def _send_forward_recv_backward(self, out: dict | None) -> dict | None:
        if self.last:
            return None
        grads = self.p2p.exchange(to_next=out, from_next=True)[1]
        _free_all(out)
        return grads

    def _send_backward_recv_forward(self, back: dict | None) -> dict | None:
        if self.first:
            return None
        return self.p2p.exchange(to_prev=back, from_prev=True)[0]


def _free_all(payload: Mapping[str, torch.Tensor]) -> None:
    for t in payload.values():
        _free(t)


def stage_lines(stages: Sequence[Stage], schedule: str) -> list[str]:
    """One line per pipeline stage: what it holds (global layer indices, inclusive)."""
    def span(r: range) -> str:
        return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)

    lines = [f"pipeline: {len(stages)} stages, {schedule} schedule"]
    for st in stages:
        parts = [f"{label} {span(r)}" for label, r in (("vision blocks", st.vision_blocks), ("audio layers", st.audio_layers)) if r]
        parts += ["merge + token embedding"] if st.text_embed else []
        parts += [f"LLM layers {span(st.text_layers)}"] if st.text_layers else []
        parts += ["final norm + lm_head"] if st.text_head else []
        lines.append(f"  stage {st.index}: " + ", ".join(parts))
    return lines


@attrs.define
class StageTimes:
    """This pipeline stage's time over the run's measured steps (after the log's warm-up steps)."""

    steps: int = 0
    micro_batches: int = 0
    step_seconds: float = 0.0
    busy_seconds: float = 0.0  # forward and backward work
    schedule_seconds: float = 0.0  # the schedule from first receive to last send

    def add(self, trace, step_seconds: float, *, warmup: bool) -> None:
        if warmup:
            return
        self.steps += 1
        self.micro_batches += sum(1 for kind, _ in trace.events if kind == "F")
        self.step_seconds += step_seconds
        self.busy_seconds += trace.busy_seconds
        self.schedule_seconds += trace.total_seconds

    def summary(self, stage: int) -> dict:
        n = max(self.steps, 1)
        return {"stage": stage, "steps": self.steps, "micro_batches": self.micro_batches / n, "step_seconds": self.step_seconds / n,
                "busy_seconds": self.busy_seconds / n, "schedule_seconds": self.schedule_seconds / n}  # fmt: skip


def log_stage_times(times: StageTimes, mesh: Mesh, log, schedule: str) -> None:
    """Collective: every stage's step time and bubble fraction, logged once by the main rank with the
    analytic 1F1B / GPipe bubble (p - 1) / (m + p - 1). A stage's bubble is its idle share of the
    pipeline's schedule, the longest stage's (every stage starts together on the step's header; the
    first stage ends last, with its final backward), so later stages are not flattered by ending early."""
    everyone: list = [None] * mesh.world
    dist.all_gather_object(everyone, (mesh.dp_rank, mesh.tp_rank, times.summary(mesh.pp_rank)))
    if not mesh.is_main:
        return
    stages = sorted((s for dp, tp, s in everyone if dp == 0 and tp == 0), key=lambda s: s["stage"])
    if not stages[0]["steps"]:
        return
    makespan = max(s["schedule_seconds"] for s in stages)
    for s in stages:
        s["bubble"] = max(0.0, 1.0 - s["busy_seconds"] / makespan) if makespan > 0 else 0.0
    m, p = stages[0]["micro_batches"], mesh.pp
    analytic = (p - 1) / (m + p - 1)
    log.message(f"pipeline ({schedule}, {p} stages, {m:g} micro-batches per step, {stages[0]['steps']} steps measured): "
                + "; ".join(f"stage {s['stage']} {s['step_seconds']:.3f} s/step, bubble {100 * s['bubble']:.1f} %" for s in stages)
                + f"; analytic bubble {100 * analytic:.1f} %")  # fmt: skip
    log.event("pipeline", schedule=schedule, stages=stages, analytic_bubble=analytic)
