"""One rank of a fault-injection run: `fault_worker.py JOB_JSON`, a train_worker job plus
`poison` = {"rank": R, "steps": [...], "value": "nan" | "inf"}: on rank R, at those steps (1-based),
one gradient element becomes NaN / Inf just before the step's reductions, so only that rank holds
it; or `stall` = {"rank": R, "step": S, "seconds": T}: rank R sleeps T seconds there instead.
Every rank writes `outcome-<rank>.json` (finished, or stopped with the error, and when) and exits 0."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import train_worker

import omnicore_dist.train as train_module
from omnicore_dist.mesh import close_distributed
from omnicore_dist.train import BadStep
from omnicore_dist.watchdog import CollectiveTimeout


def main(job: dict) -> None:
    rank = int(os.environ["RANK"])
    poison, stall = job.get("poison", {"rank": -1}), job.get("stall", {"rank": -1})
    update, calls = train_module._update, [0]

    def faulty(optimizer, grads, mesh, tp, **kwargs):
        calls[0] += 1
        if rank == poison["rank"] and calls[0] in poison["steps"] and grads.flat.numel():
            grads.flat[0] = float(poison["value"])
        if rank == stall["rank"] and calls[0] == stall["step"]:
            time.sleep(stall["seconds"])
        return update(optimizer, grads, mesh, tp, **kwargs)

    train_module._update = faulty
    outcome = {"rank": rank, "stopped": False, "message": ""}
    started = time.monotonic()
    try:
        train_worker.main(job)
    except BadStep as err:
        outcome = {"rank": rank, "stopped": True, "message": str(err)}
        close_distributed()
    except CollectiveTimeout as err:  # the group is broken: nothing left to close cleanly
        outcome = {"rank": rank, "stopped": True, "message": str(err)}
    outcome["seconds"] = time.monotonic() - started
    Path(job["base"], f"outcome-{rank}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
