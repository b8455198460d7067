"""One rank of bench_tp_comm: a TP = 2 training step with every collective's bytes counted."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from bench_thinker import BENCH_CONFIG
from bench_train import MEDIUM
from hf_reference import Piece, build_batch
from omnicore.models.thinker import init_thinker, prepare_inputs
from omnicore.ops import CPU
from omnicore_dist.comm import TPComm
from omnicore_dist.mesh import Mesh
from omnicore_dist.optim import AdamW
from omnicore_dist.tp import grad_roles, norm_weights, shard_for_rank
from omnicore_dist.train import GradBuffer, TPState, train_step

COUNTS: Counter = Counter()


def _counting(name, fn):
    def wrapped(*args, **kwargs):
        tensors = args[0] if isinstance(args[0], list) else [args[0]]
        if name == "all_gather":
            tensors = [args[1]]
        COUNTS[name] += sum(t.numel() * t.element_size() for t in tensors)
        return fn(*args, **kwargs)

    return wrapped


def analytic(cfg, inputs) -> int:
    t, v, a = cfg.text, cfg.vision, cfg.audio
    n = inputs.input_ids.numel()
    k = int((inputs.targets != -100).sum())
    total = 4 * n * t.hidden * t.n_layers + n * t.hidden + k * t.hidden + 3 * k
    if inputs.images is not None:
        patches = inputs.images.values.shape[0]
        total += 4 * patches * v.hidden * v.depth + (patches // 4) * (4 * v.hidden + v.out_hidden)  # merger: fc1 in, fc2 out
    if inputs.audios is not None:
        frames = int(inputs.audios.layout.kept.sum())
        total += 4 * frames * a.d_model * a.n_layers
    return total * 4 + 4  # fp32, plus the norm's one scalar


def main(job: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    cfg = BENCH_CONFIG if job["config"] == "tiny" else MEDIUM
    pieces = [[Piece("text", 40), Piece("image", grid=(1, 8, 8)), Piece("text", 40), Piece("audio", 200), Piece("text", 300)]]
    batch = build_batch(cfg, pieces * 2, seed=0, padding="right")
    full = init_thinker(cfg, seed=0, std=0.02)
    params = {k: v.requires_grad_(k != "audio.bos_eos.weight") for k, v in shard_for_rank(cfg, full, rank, size).items()}
    trainable = {k: v for k, v in params.items() if v.requires_grad}
    roles = grad_roles(cfg, trainable, size)
    tp = TPState(comm=TPComm(dist.group.WORLD, rank, size), roles=roles, weights=norm_weights(roles))
    mesh = Mesh(world=size, rank=rank, dp=1, pp=1, tp=size, tp_group=dist.group.WORLD)
    opt = AdamW(trainable, lr=1e-4)
    grads = GradBuffer(trainable)
    inputs = prepare_inputs(cfg, batch)
    for name in ("all_reduce", "all_gather"):
        setattr(dist, name, _counting(name, getattr(dist, name)))
    train_step(params, grads, opt, cfg, [inputs], lr=1e-4, mesh=mesh, ops=CPU, tp=tp)
    if rank == 0:
        result = {"measured": sum(COUNTS.values()), "analytic": analytic(cfg, inputs), "by_kind": dict(COUNTS), "tokens": inputs.input_ids.numel()}
        Path(job["out"], "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
