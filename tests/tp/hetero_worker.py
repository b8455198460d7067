"""One rank of the hetero-parallel equality test: `hetero_worker.py JOB_JSON` (env:// rendezvous from dist_launch).

JOB: case (a key of CASES), out (folder), vit_tp, audio_tp, sequence_parallel (optional). The world is
one LLM TP group; encoders with a smaller TP run as data-parallel replicas inside it. Gradients
accumulate in the trainer's flat buffer and go through the trainer's reductions (kv copies,
sequence-parallel partials, encoder replicas); rank 0 writes the loss, the gradient norm and the
gathered gradients."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from hf_reference import Piece, build_batch
from tp_worker import TINY

from omnicore.models.thinker import init_thinker, thinker_token_losses
from omnicore.ops import CPU
from omnicore_dist.comm import TPComm
from omnicore_dist.hetero import hetero_encoders, sum_encoder_replicas
from omnicore_dist.mesh import build_mesh
from omnicore_dist.tp import gather_full, grad_roles, norm_weights, shard_for_rank, sum_partial, sum_replicated_kv
from omnicore_dist.train import GradBuffer, global_norm

T, I, V, A, VA = "text", "image", "video", "audio", "video_audio"
# Four samples per micro-batch (so 2 and 4 replicas divide it). "mixed": sample 0 and 2 are text
# only, so at 4 replicas two replicas encode nothing at all, and at 2 replicas each holds one media
# sample. "sparse": one image in the last sample, audio in the first: most replicas get no media of a kind.
CASES = {
    "mixed": [[Piece(T, 6)], [Piece(T, 2), Piece(I, grid=(1, 4, 4)), Piece(T, 2), Piece(A, 90)], [Piece(T, 4)],
              [Piece(T, 2), Piece(VA, 300, grid=(2, 4, 4)), Piece(T, 2)]],  # fmt: skip
    "sparse": [[Piece(A, 250), Piece(T, 4)], [Piece(T, 5)], [Piece(T, 3)], [Piece(T, 3), Piece(I, grid=(1, 4, 6)), Piece(T, 4)]],
    # three samples, as a token-budget micro-batch may hold: runs of ceil(3 / replicas) samples
    "odd": [[Piece(T, 2), Piece(I, grid=(1, 4, 4)), Piece(T, 2)], [Piece(A, 90), Piece(T, 3)], [Piece(T, 2), Piece(I, grid=(1, 4, 6)), Piece(T, 2)]],
}


def batch(case: str) -> dict:
    b = build_batch(TINY, CASES[case], seed=3)
    b.pop("use_audio_in_video", None)
    return b


def reference(case: str):
    """One process: mean loss, full gradients and their norm."""
    params = {k: v.requires_grad_() for k, v in init_thinker(TINY, seed=5, std=0.2).items()}
    losses, _ = thinker_token_losses(params, TINY, batch(case), ops=CPU)
    loss = losses.mean()
    loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    norm = torch.stack([g.double().norm() for g in grads.values()]).norm()
    return loss.detach(), grads, norm


def main(job: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    mesh = build_mesh(size, rank, tp=size)
    sizes = {"text": size, "vision": job["vit_tp"], "audio": job["audio_tp"]}
    sp = job.get("sequence_parallel", False)
    comm = TPComm(mesh.tp_group, rank, size, sequence_parallel=sp, encoders=hetero_encoders(mesh, sizes))
    params = shard_for_rank(TINY, init_thinker(TINY, seed=5, std=0.2), rank, size, sizes)
    for p in params.values():
        p.requires_grad_()
    buffer = GradBuffer(params)
    buffer.zero()
    losses, _ = thinker_token_losses(params, TINY, batch(job["case"]), ops=CPU, comm=comm)
    loss = losses.mean()
    loss.backward()
    roles = grad_roles(TINY, params, size, sequence_parallel=sp, tower_tp=sizes)
    sum_replicated_kv(buffer.views, roles, rank=rank, group=mesh.tp_group)
    sum_partial(buffer.views, roles, group=mesh.tp_group)
    sum_encoder_replicas(buffer.flat, buffer.views, roles, comm.encoders)
    norm = global_norm(buffer.views, norm_weights(roles), [mesh.tp_group])
    grads = gather_full(TINY, buffer.views, size=size, group=mesh.tp_group, tower_tp=sizes)
    if rank == 0:
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"loss": loss.detach().reshape(1), "norm": norm.reshape(1)} | {k: v.contiguous() for k, v in grads.items()}
        save_file(tensors, str(out / "result.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
