"""Shared inputs for the optimizer tests and the gloo worker: parameters, gradients, schedule, launcher.

Gradients are multiples of 1/256 below 2**6 in magnitude, so the per-rank pieces sum exactly in fp32
in any order and any DP size: the global gradient of a step is bit-identical however it was reduced.
The launcher starts one process per rank and fails naming each rank that hangs or crashes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from omnicore_dist.optim import AdamW, clip_grad_norm_
from omnicore_dist.schedule import LRSchedule, lr_at

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("zero_worker.py")

SHAPES = {
    "text.embed.weight": (37, 13),  # odd numel: padded chunks for DP 2 and 4
    "text.layers.0.attn.q.weight": (24, 16),
    "text.layers.0.attn.q.bias": (24,),
    "text.layers.0.input_norm.weight": (16,),
    "vision.blocks.0.attn.q.weight": (8, 16),
    "vision.blocks.0.norm1.weight": (8,),
    "audio.layers.0.attn.k.bias": (3,),  # fewer elements than DP 4 ranks: the last rank owns none
    "lm_head.weight": (37, 16),  # frozen
}
FROZEN = {"lm_head.weight"}
BF16 = {"text.embed.weight", "vision.blocks.0.attn.q.weight"}  # low precision in the "mixed" cases
RULES = [(r"^vision\.", 0.1, None), (r"(norm[^.]*\.weight|\.bias)$", None, 0.0)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, groups=RULES)
SCHEDULE = LRSchedule(lr=1e-2, min_lr=1e-3, decay_steps=12, warmup_steps=2)
CLIP = 15.0  # below the global norms of these gradients (~18.5): clipping is active


def make_params(mixed: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for name, shape in SHAPES.items():
        t = torch.randn(shape, generator=gen)
        if mixed and name in BF16:
            t = t.bfloat16()
        out[name] = t.requires_grad_(name not in FROZEN)
    return out


def _exact(gen: torch.Generator, shape) -> torch.Tensor:
    return torch.randint(-256, 257, shape, generator=gen).float() / 256


def global_grads(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + step)
    return {n: _exact(gen, s) for n, s in SHAPES.items() if n not in FROZEN}


def local_grads(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share of `global_grads(step)`; the shares of all ranks sum to it exactly."""
    out = {}
    for name, g in global_grads(step).items():
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + step)
        parts = [_exact(gen, g.shape) for _ in range(world - 1)]
        out[name] = parts[rank] if rank < world - 1 else g - sum(parts, torch.zeros_like(g))
    return out


def reference(params: dict[str, torch.Tensor], start: int, stop: int, *, clip: bool, opt: AdamW | None = None):
    """Plain AdamW on the global gradients of steps [start, stop), clipped to CLIP when `clip`;
    returns (optimizer, pre-clip grad norms)."""
    opt = opt or AdamW(params, **HYPER)
    norms = []
    for t in range(start, stop):
        grads = global_grads(t)
        norms.append(float(clip_grad_norm_(grads, CLIP if clip else None)))
        opt.step(grads, lr=lr_at(SCHEDULE, opt.num_steps))
    return opt, norms


def save_shard(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"zero": json.dumps(meta)})


def load_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["zero"])
    return load_file(str(path)), meta


def launch(world: int, job: dict, tmp: Path, *, timeout: float = 60.0) -> None:
    """Run zero_worker.py as `world` gloo ranks; a hang or a crash fails naming the rank(s)."""
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / f"store-{time.monotonic_ns()}"  # file rendezvous: no ports to collide
    logs = [tmp / f"rank{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as log:
            cmd = [sys.executable, str(WORKER), str(r), str(world), str(store), json.dumps(job)]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    stuck = [r for r, p in enumerate(procs) if p.poll() is None]
    for r in stuck:
        procs[r].kill()
        procs[r].wait()

    def tail(r: int) -> str:
        return " | ".join(logs[r].read_text().strip().splitlines()[-3:])

    if stuck:
        raise AssertionError(f"hung after {timeout:.0f} s: " + "; ".join(f"rank {r} (last output: {tail(r)})" for r in stuck))
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise AssertionError("; ".join(f"rank {r} exited {procs[r].returncode}: {tail(r)}" for r in failed))
