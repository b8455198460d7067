"""One gloo rank of a ZeRO-1 run: `zero_worker.py RANK WORLD STORE JOB_JSON` (started by zero_cases.launch).

JOB: mixed (bf16 + fp32 parameters), start / stop (steps), clip (to zero_cases.CLIP or not), average,
bucket_numel, load (a folder with params.safetensors and optim-dpNN.safetensors, or null), out, save_at
(steps after which to write out/stepN/{params-rR, optim-dpNN}.safetensors and norms-rR.json), hang_rank
(that rank sleeps before joining, so the others block in the rendezvous: tests the launcher's report).
"""

from __future__ import annotations

import json
import sys
import time

if __name__ == "__main__":
    _rank, _job = int(sys.argv[1]), json.loads(sys.argv[4])
    if _job["hang_rank"] == _rank:  # before importing torch: the hang report must not wait for imports
        print(f"rank {_rank} sleeping before init", flush=True)
        time.sleep(3600)

import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from zero_cases import CLIP, FROZEN, HYPER, SCHEDULE, load_shard, local_grads, make_params, save_shard
from omnicore_dist.optim import ZeroAdamW, all_reduce_sum, clip_grad_norm_
from omnicore_dist.schedule import lr_at


def main(rank: int, world: int, store: str, job: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    group = dist.new_group(list(range(world)))
    if job["load"]:
        params = load_file(str(Path(job["load"]) / "params.safetensors"))
        params = {n: p.requires_grad_(n not in FROZEN) for n, p in params.items()}
    else:
        params = make_params(job["mixed"])
    opt = ZeroAdamW(params, dp_group=group, average=job["average"], bucket_numel=job["bucket_numel"], **HYPER)
    if job["load"]:
        opt.load_state_dict(*load_shard(Path(job["load"]) / f"optim-dp{rank:02d}.safetensors"))
    assert opt.num_steps == job["start"], (opt.num_steps, job["start"])
    clip = CLIP if job["clip"] else None
    norms = []
    for t in range(job["start"], job["stop"]):
        print(f"step {t}", flush=True)
        grads = local_grads(t, rank, world)
        if job["average"]:  # scaled by a power of two: still exact, and `average` must undo it
            grads = {n: g * world for n, g in grads.items()}
        shards = opt.reduce_grads(grads)
        norms.append(float(clip_grad_norm_(shards, clip, reduce_sq=all_reduce_sum(group))))
        opt.step(shards, lr=lr_at(SCHEDULE, opt.num_steps))
        if t + 1 in job["save_at"]:
            out = Path(job["out"]) / f"step{t + 1}"
            out.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach() for n, p in params.items()}, str(out / f"params-r{rank}.safetensors"))
            save_shard(out / f"optim-dp{rank:02d}.safetensors", opt.state_dict(), opt.metadata())
            (out / f"norms-r{rank}.json").write_text(json.dumps(norms))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]))
