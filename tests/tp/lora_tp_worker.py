"""One rank of the LoRA TP equality test: `lora_tp_worker.py JOB_JSON` (env:// rendezvous from dist_launch).

JOB: case (a key of tp_worker.CASES), out (folder), sequence_parallel: rank 0 writes the loss and
the adapters' gathered gradients. The base is frozen; only A and B get gradients."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hf_reference import build_batch
from safetensors.torch import save_file
from tp_worker import CASES, TINY

from omnicore.layout import shard_tensor
from omnicore.lora import LoraSpec, adapted, adapter_rule, init_adapters
from omnicore.models.thinker import init_thinker, thinker_token_losses, tp_plans
from omnicore.ops import CPU
from omnicore_dist.comm import TPComm
from omnicore_dist.lora import LoraRun, lora_grad_roles
from omnicore_dist.mesh import build_mesh
from omnicore_dist.tp import shard_for_rank, sum_partial, sum_replicated_kv

SPEC = LoraSpec(targets=["all"], r=4, alpha=8, towers=["llm", "vision", "audio"])


def full_adapters():
    gen = torch.Generator().manual_seed(11)
    a = init_adapters(TINY, SPEC, seed=7)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 if k.endswith("lora_B") else v for k, v in a.items()}


def loss_and_grads(case: str, rank: int = 0, size: int = 1, group=None, sequence_parallel: bool = False, mesh=None):
    """Mean loss and the adapters' full gradients (TP over `group` when size > 1)."""
    base = init_thinker(TINY, seed=5, std=0.2)
    adapters = full_adapters()
    if size > 1:
        base = shard_for_rank(TINY, base, rank, size)
        plans = tp_plans(TINY)
        adapters = {k: shard_tensor(v, adapter_rule(k, plans), rank, size, k).contiguous().clone() for k, v in adapters.items()}
    adapters = {k: v.requires_grad_() for k, v in adapters.items()}
    batch = build_batch(TINY, CASES[case], seed=3)
    batch.pop("use_audio_in_video", None)
    kwargs = {"comm": TPComm(group, rank, size, sequence_parallel=sequence_parallel)} if size > 1 else {}
    losses, _ = thinker_token_losses(adapted(base, adapters, SPEC, train=True), TINY, batch, ops=CPU, **kwargs)
    loss = losses.mean()
    loss.backward()
    assert all(p.grad is None for p in base.values()), "a frozen base weight got a gradient"
    grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in adapters.items()}  # towers without media
    if size > 1:
        roles = lora_grad_roles(TINY, grads, size)
        sum_replicated_kv(grads, roles, rank=rank, group=group)
        sum_partial(grads, roles, group=group)
        run = LoraRun(spec=SPEC, adapters=grads, base={}, checkpoint=None)
        grads = run.full(TINY, mesh)
    return loss.detach(), grads


def main(job: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    mesh = build_mesh(size, rank, tp=size, pp=1)
    loss, grads = loss_and_grads(job["case"], rank, size, mesh.tp_group, job.get("sequence_parallel", False), mesh)
    if rank == 0:
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        save_file({"loss": loss.reshape(1)} | {k: v.contiguous() for k, v in grads.items()}, str(out / "result.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
