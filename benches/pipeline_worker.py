"""One stage of bench_pipeline: `pipeline_worker.py JOB_JSON` (env:// rendezvous from dist_launch), p ranks = p stages.

JOB: micro (micro-batch counts), t_f (seconds of one stage forward; backward takes 2 t_f), repeats, out (folder).
For every m in `micro` and both schedules it measures
  bubble: a stage whose forward and backward *wait* t_f and 2 t_f (sleeps, not CPU work, so p processes
          on fewer cores still measure the schedule, not core contention); wall time on a clock shared by
          the processes (CLOCK_MONOTONIC), from the first stage's start to the last stage's end;
  memory: a stage of real (N, C) matmuls, no sleeping: the peak bytes of tensors saved for backward
          (parameters excluded), counted by saved_tensors_hooks.
Rank 0 writes result.json with every stage's figures.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from omnicore_dist.mesh import build_mesh
from omnicore_dist.pipeline import P2P, SCHEDULES, StageExecutor

N, C, LAYERS = 256, 64, 2  # the memory stage's activation: (N, C) per layer input and per tanh output


class Wait(torch.autograd.Function):
    """Identity whose forward sleeps t_f and whose backward sleeps 2 t_f (the usual backward / forward cost ratio)."""

    @staticmethod
    def forward(ctx, x, t_f):
        ctx.t_f = t_f
        time.sleep(t_f)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.t_f)
        return grad, None


class SavedBytes:
    """Live bytes of the storages autograd holds for backward, and their peak. Parameters (always alive)
    are not counted; a storage saved by two ops (a tanh output and the next matmul's input) counts once."""

    def __init__(self, params):
        self.params = {p.data_ptr() for p in params}
        self.refs: dict[int, int] = {}
        self.live = self.peak = self.total = 0

    def pack(self, t: torch.Tensor):
        if t.data_ptr() in self.params:
            return t
        # detach(): the executor frees a sent output by swapping its .data, and `t` may be that very
        # tensor object; the saved copy must keep the original storage.
        return _Held(self, t.detach())

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    """A saved activation; autograd drops it once that micro-batch's backward ran."""

    def __init__(self, counter: SavedBytes, t: torch.Tensor):
        self.counter, self.tensor = counter, t
        self.key, self.nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        counter.refs[self.key] = counter.refs.get(self.key, 0) + 1
        if counter.refs[self.key] == 1:
            counter.live += self.nbytes
            counter.total += self.nbytes
            counter.peak = max(counter.peak, counter.live)

    def __del__(self):
        self.counter.refs[self.key] -= 1
        if not self.counter.refs[self.key]:
            del self.counter.refs[self.key]
            self.counter.live -= self.nbytes


def stage_forward(first: bool, last: bool, body):
    """A StageExecutor forward: the first stage makes its input, the last returns a 0-d loss."""

    def forward(i: int, payload: dict):
        h = body(payload["hidden"] if not first else torch.ones(N, C))
        return h.sum() if last else {"hidden": h}

    return forward


def timed(p2p: P2P, forward, kind: str, m: int) -> dict:
    """One step under `kind`: this stage's busy seconds and own-window bubble, the step's common wall time."""
    executor = StageExecutor(p2p, forward)
    dist.barrier()
    start = time.monotonic()
    trace = executor.run(kind, m)
    end = time.monotonic()
    spans = [None] * dist.get_world_size()
    dist.all_gather_object(spans, (start, end))
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return {"wall": wall, "busy": trace.busy_seconds, "own_bubble": trace.bubble}


def main(job: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = build_mesh(world, rank, pp=world)
    p2p = P2P(mesh, torch.device("cpu"))
    first, last, t_f = mesh.pp_rank == 0, mesh.pp_rank == world - 1, job["t_f"]
    scale = torch.ones((), requires_grad=True)
    waiting = stage_forward(first, last, lambda h: Wait.apply(h * scale, t_f))
    weights = [(torch.randn(C, C) / C**0.5).requires_grad_() for _ in range(LAYERS)]

    def layers(h):
        for w in weights:
            h = torch.tanh(h @ w)
        return h

    computing = stage_forward(first, last, layers)
    result = {}
    for m in job["micro"]:
        for kind in SCHEDULES:
            timed(p2p, waiting, kind, m)  # warm-up: gloo connections, first-call allocations
            runs = [timed(p2p, waiting, kind, m) for _ in range(job["repeats"])]
            ideal = m * 3 * t_f  # this stage's own work: m forwards of t_f and m backwards of 2 t_f
            bubble = statistics.median(1 - ideal / r["wall"] for r in runs)
            busy_bubble = statistics.median(1 - r["busy"] / r["wall"] for r in runs)
            own_bubble = statistics.median(r["own_bubble"] for r in runs)
            wall = statistics.median(r["wall"] for r in runs)
            counter = SavedBytes(weights)
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                StageExecutor(p2p, computing).run(kind, m)
            stage = {"wall": wall, "bubble": bubble, "busy_bubble": busy_bubble, "own_bubble": own_bubble, "peak_saved": counter.peak,
                     "per_micro": counter.total // m, "live_after": counter.live}  # fmt: skip
            gathered = [None] * world
            dist.all_gather_object(gathered, stage)
            result[f"{kind}/{m}"] = gathered
    if rank == 0:
        Path(job["out"], "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
