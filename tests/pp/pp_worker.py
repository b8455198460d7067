"""One rank of the pipeline equality tests: `pp_worker.py JOB_JSON` (env:// rendezvous from dist_launch).

JOB: layout (Layout keyword arguments), tp, schedule, steps, freeze (parts), out (folder). Every rank
trains `steps` steps of `micro_batches(dp_rank)` from the same initial weights; each TP rank 0 of DP
rank 0 writes its stage's gathered gradients of every step and final weights, and every rank writes
its trace (events, most micro-batches in flight)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from hf_reference import Piece, build_batch
from omnicore.layout import Layout, stage_of
from omnicore.models.thinker import init_thinker, prepare_inputs, tower_depths
from omnicore.ops import CPU
from omnicore_dist.comm import TPComm
from omnicore_dist.mesh import Mesh, build_mesh
from omnicore_dist.optim import AdamW
from omnicore_dist.pipeline import P2P
from omnicore_dist.tp import gather_full, grad_roles, norm_weights, shard_for_rank
from omnicore_dist.train import GradBuffer, PipelineState, TPState, part_of, pipeline_train_step, train_step
from tp_worker import TINY

T, I, V, A, VA = "text", "image", "video", "audio", "video_audio"
# Micro-batches of different lengths and modalities (1 or 2 samples each), per DP rank.
MICRO = [
    [[Piece(T, 2), Piece(I, grid=(1, 4, 4)), Piece(T, 2), Piece(A, 90)], [Piece(T, 5)]],
    [[Piece(T, 9)]],
    [[Piece(A, 250), Piece(T, 4)], [Piece(T, 2), Piece(A, 60)]],
    [[Piece(T, 2), Piece(VA, 300, grid=(2, 4, 4)), Piece(T, 2)]],
    [[Piece(T, 3), Piece(I, grid=(1, 4, 6)), Piece(T, 4)]],
    [[Piece(T, 2), Piece(V, grid=(2, 4, 4)), Piece(T, 3)], [Piece(T, 6)]],
]
LR = 1e-3
# Gradients that are zero in exact arithmetic (k biases: softmax ignores a shift shared by all keys)
# are rounding noise that differs between layouts; an eps above that noise keeps Adam from turning
# it into whole steps, so final weights can be compared too.
EPS = 1e-6


def micro_batches(dp_rank: int, dp: int, step: int) -> list:
    """Step `step`'s micro-batches of DP rank `dp_rank` (the rows of MICRO dealt round-robin, rotated per step)."""
    rows = MICRO[step % len(MICRO) :] + MICRO[: step % len(MICRO)]
    out = []
    for j, pieces in enumerate(rows[dp_rank::dp]):
        batch = build_batch(TINY, pieces, seed=10 * step + j + 100 * dp_rank)
        batch.pop("use_audio_in_video", None)
        out.append(prepare_inputs(TINY, batch))
    return out


def trainable(params: dict, freeze) -> dict:
    return {n: p for n, p in params.items() if part_of(n) not in freeze and n != "audio.bos_eos.weight"}


def reference(steps: int, dp: int, freeze=()) -> tuple[list[float], list[dict], dict]:
    """One process over every DP rank's micro-batches: losses, gradients per step, final weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same reduction order in every matmul
    try:
        return _reference(steps, dp, freeze)
    finally:
        torch.set_num_threads(threads)


def _reference(steps: int, dp: int, freeze) -> tuple[list[float], list[dict], dict]:
    params = init_thinker(TINY, seed=5, std=0.2)
    train = trainable(params, freeze)
    for n, p in params.items():
        p.requires_grad_(n in train)
    grads, opt = GradBuffer(train), AdamW(train, lr=LR, eps=EPS)
    mesh = Mesh(world=1, rank=0, dp=1, pp=1, tp=1)
    losses, seen = [], []
    for step in range(steps):
        micro = [mb for r in range(dp) for mb in micro_batches(r, dp, step)]
        result = train_step(params, grads, opt, TINY, micro, lr=LR, mesh=mesh, ops=CPU)
        losses.append(result.loss)
        seen.append({n: v.clone() for n, v in grads.views.items()})
    return losses, seen, {n: p.detach().clone() for n, p in params.items()}


def main(job: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = Layout(**job["layout"])
    stages = layout.stages(tower_depths(TINY))
    mesh = build_mesh(world, rank, tp=job["tp"], pp=len(stages))
    stage = stages[mesh.pp_rank]
    full = init_thinker(TINY, seed=5, std=0.2)
    mine = {n: p for n, p in full.items() if stage_of(n, stages) == stage.index}
    params = shard_for_rank(TINY, mine, mesh.tp_rank, mesh.tp) if mesh.tp > 1 else mine
    train = trainable(params, set(job.get("freeze", ())))
    for n, p in params.items():
        p.requires_grad_(n in train)
    tp_state = None
    if mesh.tp > 1:
        roles = grad_roles(TINY, train, mesh.tp)
        tp_state = TPState(comm=TPComm(mesh.tp_group, mesh.tp_rank, mesh.tp), roles=roles, weights=norm_weights(roles))
    grads, opt = GradBuffer(train), AdamW(train, lr=LR, eps=EPS)
    pipe = PipelineState(stage=stage, p2p=P2P(mesh, torch.device("cpu")), schedule=job["schedule"]) if mesh.pp > 1 else None
    out = Path(job["out"])
    saved, traces = {}, []
    for step in range(job["steps"]):
        micro = micro_batches(mesh.dp_rank, mesh.dp, step) if mesh.pp_rank == 0 else None
        if pipe is None:  # the same TP x DP without a pipeline: the reference of TP layouts
            result = train_step(params, grads, opt, TINY, micro, lr=LR, mesh=mesh, ops=CPU, tp=tp_state)
            traces.append({"events": [], "max_in_flight": 0, "loss": result.loss})
        else:
            result = pipeline_train_step(params, grads, opt, TINY, micro, pipe=pipe, lr=LR, mesh=mesh, ops=CPU, tp=tp_state)
            traces.append({"events": result.pipeline.events, "max_in_flight": result.pipeline.max_in_flight, "loss": result.loss})
        step_grads = gather_full(TINY, grads.views, size=mesh.tp, group=mesh.tp_group) if mesh.tp > 1 else grads.views
        saved |= {f"grad{step}.{n}": v.clone() for n, v in step_grads.items()}
    final = gather_full(TINY, params, size=mesh.tp, group=mesh.tp_group) if mesh.tp > 1 else params
    saved |= {f"final.{n}": v.detach().clone() for n, v in final.items()}
    out.mkdir(parents=True, exist_ok=True)
    if mesh.tp_rank == 0 and mesh.dp_rank == 0:
        save_file({k: v.contiguous() for k, v in saved.items()}, str(out / f"stage{mesh.pp_rank}.safetensors"))
    (out / f"trace{rank}.json").write_text(json.dumps({"stage": mesh.pp_rank, "stages": mesh.pp, "dp_rank": mesh.dp_rank, "steps": traces}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
