"""One rank of the TP equality test: `tp_worker.py JOB_JSON` (env:// rendezvous from dist_launch).

JOB: case (a key of CASES), out (folder), sequence_parallel (optional): rank 0 writes the loss and the gathered gradients."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from hf_reference import Piece, build_batch
import attrs

from omnicore.config import TINY as _TINY
from omnicore.models.thinker import init_thinker, thinker_token_losses
from omnicore.ops import CPU
from omnicore_dist.comm import TPComm
from omnicore_dist.tp import gather_full, grad_roles, shard_for_rank, sum_partial, sum_replicated_kv

# TINY with 4-head encoders, so TP 4 splits every tower (text: 4 query heads, 2 kv heads).
TINY = attrs.evolve(_TINY, vision=attrs.evolve(_TINY.vision, n_heads=4), audio=attrs.evolve(_TINY.audio, n_heads=4))
T, I, V, A, VA = "text", "image", "video", "audio", "video_audio"
CASES = {
    "text": [[Piece(T, 9)], [Piece(T, 5)]],
    "image": [[Piece(T, 3), Piece(I, grid=(1, 4, 6)), Piece(T, 4)]],
    "video": [[Piece(T, 2), Piece(V, grid=(2, 4, 4)), Piece(T, 3)]],
    "audio": [[Piece(A, 250), Piece(T, 4)], [Piece(T, 2), Piece(A, 60)]],
    "mixed": [[Piece(T, 2), Piece(I, grid=(1, 4, 4)), Piece(T, 2), Piece(A, 90)], [Piece(T, 2), Piece(VA, 300, grid=(2, 4, 4)), Piece(T, 2)]],
}


def loss_and_grads(case: str, rank: int = 0, size: int = 1, group=None, sequence_parallel: bool = False):
    """Mean loss and full gradients of the tiny thinker (TP over `group` when size > 1)."""
    full = init_thinker(TINY, seed=5, std=0.2)
    params = {k: v.requires_grad_() for k, v in (shard_for_rank(TINY, full, rank, size) if size > 1 else full).items()}
    batch = build_batch(TINY, CASES[case], seed=3)
    batch.pop("use_audio_in_video", None)
    comm = TPComm(group, rank, size, sequence_parallel=sequence_parallel) if size > 1 else None
    kwargs = {"comm": comm} if comm else {}
    losses, _ = thinker_token_losses(params, TINY, batch, ops=CPU, **kwargs)
    loss = losses.mean()
    loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    if size > 1:
        roles = grad_roles(TINY, grads, size, sequence_parallel=sequence_parallel)
        sum_replicated_kv(grads, roles, rank=rank, group=group)
        sum_partial(grads, roles, group=group)
        grads = gather_full(TINY, grads, size=size, group=group)
    return loss.detach(), grads


def main(job: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    loss, grads = loss_and_grads(job["case"], rank, size, dist.group.WORLD, job.get("sequence_parallel", False))
    if rank == 0:
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        save_file({"loss": loss.reshape(1)} | {k: v.contiguous() for k, v in grads.items()}, str(out / "result.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
