"""A NaN / Inf gradient on one rank inside TP and PP groups (4 processes, gloo, timeouts): the
gradient norm is global, so every rank sees it. Default: every rank stops before the update, the
newest checkpoint is the step before. With `bad_step_policy = "skip"`: every rank skips that step
(weights unchanged), and three bad steps in a row stop the run anyway."""

from __future__ import annotations

import json

import pytest
import torch
from dist_launch import launch

from omnicore.checkpoint.native import load_native

LAYOUTS = {"tp2-pp2": ["--parallel.tp=2", "--parallel.llm_pp_layers=[1,2]"], "dp2-pp2": ["--parallel.llm_pp_layers=[1,2]"]}
VICTIM = 3  # stage 1's second rank: TP rank 1 (tp2-pp2) or DP rank 1 (dp2-pp2)


def _fault_run(tiny_hf, tmp_path, layout, *, steps, value, extra=(), iters=4):
    base = tmp_path / "run-folder"
    job = {"hf": str(tiny_hf), "base": str(base), "iters": iters, "overrides": [*LAYOUTS[layout], "--checkpoint.save_interval=1", *extra],
           "poison": {"rank": VICTIM, "steps": steps, "value": value}}  # fmt: skip
    launch(4, ["tests/train/fault_worker.py", json.dumps(job)], tmp_path / "logs", timeout=300)
    outcomes = [json.loads((base / f"outcome-{r}.json").read_text()) for r in range(4)]
    records = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines() if '"skipped"' in line]
    return base / "run", outcomes, records


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_ranks_nan_stops_every_rank_before_the_update(tiny_hf, tmp_path, layout):
    run_dir, outcomes, _ = _fault_run(tiny_hf, tmp_path, layout, steps=[2], value="nan")
    assert all(o["stopped"] and "non-finite gradient norm" in o["message"] for o in outcomes), outcomes
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (run_dir / "iter_0000002").exists()
    assert "stopped at step 2" in (run_dir / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_skip_policy_skips_on_every_rank_and_three_in_a_row_stop(tiny_hf, tmp_path, layout):
    run_dir, outcomes, records = _fault_run(tiny_hf, tmp_path / "one", layout, steps=[2], value="inf", extra=['--train.bad_step_policy="skip"'])
    assert not any(o["stopped"] for o in outcomes)
    assert [r["skipped"] for r in records] == [False, True, False, False]
    before, after = load_native(run_dir, iteration=1)[1], load_native(run_dir, iteration=2)[1]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed nothing
    assert not all(torch.equal(after[k], v) for k, v in load_native(run_dir, iteration=3)[1].items())

    run_dir, outcomes, records = _fault_run(tiny_hf, tmp_path / "three", layout, steps=[2, 3, 4], value="nan", iters=5,
                                            extra=['--train.bad_step_policy="skip"'])  # fmt: skip
    assert all(o["stopped"] for o in outcomes), outcomes
    assert [r["skipped"] for r in records] == [False, True, True]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text() == "3"
