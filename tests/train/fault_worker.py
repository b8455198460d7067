"""One rank of a fault-injection run: `fault_worker.py JOB_JSON`, a train_worker job plus
`poison` = {"rank": R, "steps": [...], "value": "nan" | "inf"}: on rank R, at those steps (1-based),
one gradient element becomes NaN / Inf just before the step's reductions, so only that rank holds
it. Every rank writes `outcome-<rank>.json` (finished, or stopped with the error) and exits 0."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import train_worker

import omnicore_dist.train as train_module
from omnicore_dist.mesh import close_distributed
from omnicore_dist.train import BadStep


def main(job: dict) -> None:
    rank, poison = int(os.environ["RANK"]), job["poison"]
    update, calls = train_module._update, [0]

    def poisoned(optimizer, grads, mesh, tp, **kwargs):
        calls[0] += 1
        if rank == poison["rank"] and calls[0] in poison["steps"] and grads.flat.numel():
            grads.flat[0] = float(poison["value"])
        return update(optimizer, grads, mesh, tp, **kwargs)

    train_module._update = poisoned
    outcome = {"rank": rank, "stopped": False, "message": ""}
    try:
        train_worker.main(job)
    except BadStep as err:
        outcome = {"rank": rank, "stopped": True, "message": str(err)}
        close_distributed()
    Path(job["base"], f"outcome-{rank}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
