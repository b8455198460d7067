"""A rank that stalls inside a collective (2 processes, gloo, timeouts): the job fails within
`parallel.timeout_minutes` with an error naming the operation, the step and the stalled rank, never
a silent hang."""

from __future__ import annotations

import json

import pytest
from dist_launch import launch

TIMEOUT_MINUTES = 0.1  # 6 s
STALL_SECONDS = 15  # well past the 6 s timeout (detection took under 9 s), and the test waits for it


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout, operation", [([], "gradient reduction and norm (TP / DP)"),
                                               (["--parallel.llm_pp_layers=[1,2]"], "gradient reduction and norm (TP / DP / PP)")],
                         ids=["dp2", "pp2"])  # fmt: skip
def test_a_stalled_rank_is_named_within_the_timeout(tiny_hf, tmp_path, layout, operation):
    base = tmp_path / "run-folder"
    job = {"hf": str(tiny_hf), "base": str(base), "iters": 4, "overrides": [*layout, f"--parallel.timeout_minutes={TIMEOUT_MINUTES}"],
           "stall": {"rank": 1, "step": 2, "seconds": STALL_SECONDS}}  # fmt: skip
    launch(2, ["tests/train/fault_worker.py", json.dumps(job)], tmp_path / "logs", timeout=200)
    waiting, stalled = (json.loads((base / f"outcome-{r}.json").read_text()) for r in range(2))
    assert waiting["stopped"] and stalled["stopped"], (waiting, stalled)
    message = waiting["message"]
    assert f"rank 0: {operation} at step 2 did not complete within parallel.timeout_minutes (0.1 min)" in message, message
    assert f"not joined or stalled: rank 1 (last at step 2: {operation}" in message, message
    assert waiting["seconds"] < STALL_SECONDS  # failed on its own timeout, not when the stalled rank came back
