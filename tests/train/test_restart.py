"""Restarts and preemption: a run folder holding checkpoints is continued from its newest one (what
torchrun's --max-restarts and a re-submitted job need), SIGTERM saves the current step and exits 0,
and both continue exactly: losses and final parameters bit-identical to the uninterrupted run of the
same layout (one process, or DP 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from dist_launch import ROOT, finish, free_port, launch, start

from omnicore.checkpoint.commit import read_tracker
from omnicore.checkpoint.native import load_native
from omnicore_dist.config import ConfigError, load_run_config
from omnicore_dist.run import run

def _run(base: Path, hf: Path, iters: int, overrides=(), stop_after=None) -> dict:
    import train_worker

    base.mkdir(parents=True, exist_ok=True)
    (base / "run.toml").write_text(train_worker.CONFIG.format(hf=hf, iters=iters))
    cfg = load_run_config(base / "run.toml", ["--checkpoint.save_interval=2", *overrides])
    return run(cfg, base=base, samples=train_worker.samples(), stop_after=stop_after)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    """The loss of each step; a step trained again after a restart counts with its last value."""
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r and "event" not in r}


def _same_params(run_dir: Path, reference: dict) -> None:
    final = load_native(run_dir)[1]
    assert final.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(final[k], v), k


def _dp2_job(base: Path, hf: Path, save_interval: int) -> dict:
    return {"hf": str(hf), "base": str(base), "iters": 10, "overrides": [f"--checkpoint.save_interval={save_interval}"]}


@pytest.fixture(scope="module")
def straight_dp2(tiny_hf, tmp_path_factory):
    """Ten steps on two processes (DP 2), uninterrupted."""
    base = tmp_path_factory.mktemp("straight_dp2")
    launch(2, ["tests/train/train_worker.py", json.dumps(_dp2_job(base, tiny_hf, 4))], base / "logs", timeout=300)
    return _losses(base / "run"), load_native(base / "run")[1]


@pytest.fixture(scope="module")
def straight(tiny_hf, tmp_path_factory):
    """Ten steps in one process, uninterrupted."""
    base = tmp_path_factory.mktemp("straight")
    _run(base, tiny_hf, 10)
    return _losses(base / "run"), load_native(base / "run")[1]


def test_a_run_folder_with_checkpoints_is_continued_from_its_newest(straight, tiny_hf, tmp_path, monkeypatch):
    base = tmp_path / "job"
    _run(base, tiny_hf, 10, stop_after=3)  # checkpoints at 2 and 3; then the job "dies"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # as torchrun sets it on a restart
    summary = _run(base, tiny_hf, 10, ["--checkpoint.export_hf=export"])  # the same config, started again
    assert summary["step"] == 10
    assert _losses(base / "run") == straight[0]
    _same_params(base / "run", straight[1])
    restarts = [r for r in _records(base / "run") if r.get("event") == "restart"]
    assert restarts == [{"event": "restart", "count": 1, "step": 3}]
    assert (base / "export" / "config.json").exists()  # the original HF folder is still known for export
    assert "load = " in (base / "run" / "config.toml").read_text() and str(tiny_hf) in (base / "run" / "config.toml").read_text()


def test_a_finished_run_started_again_trains_nothing(tiny_hf, tmp_path):
    base = tmp_path / "job"
    _run(base, tiny_hf, 2)
    before = sorted(p.name for p in (base / "run").iterdir())
    summary = _run(base, tiny_hf, 2)
    assert summary["step"] == 2 and read_tracker(base / "run") == "2"
    assert sorted(p.name for p in (base / "run").iterdir()) == before  # no checkpoint written
    assert [r["step"] for r in _records(base / "run") if "loss" in r and "event" not in r] == [1, 2]  # no step trained again


def test_resume_never_refuses_a_run_folder_with_checkpoints(tiny_hf, tmp_path):
    base = tmp_path / "job"
    _run(base, tiny_hf, 2)
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(newest: iteration 2\)"):
        _run(base, tiny_hf, 4, ["--checkpoint.resume=never"])


def _wait_for_step(run_dir: Path, step: int, procs, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(s >= step for s in _losses(run_dir)):
            return
        if procs is not None and all(p.poll() is not None for p, _ in procs):
            raise AssertionError("the job ended before the step to interrupt it at")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_saves_the_current_step_exits_0_and_continues_exactly(straight_dp2, tiny_hf, tmp_path):
    """SIGTERM (twice: the second lands during the save) to rank 1 only: both ranks stop after the
    same step, its checkpoint is complete, both exit 0; the job started again finishes the run."""
    base = tmp_path / "job"
    job = _dp2_job(base, tiny_hf, 4)
    procs = start(2, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs")
    _wait_for_step(base / "run", 2, procs)
    procs[1][0].send_signal(signal.SIGTERM)
    time.sleep(0.05)
    procs[1][0].send_signal(signal.SIGTERM)
    finish(procs, tmp_path / "logs", timeout=200)  # every rank exited 0
    stopped = [r for r in _records(base / "run") if r.get("event") == "preempted"]
    assert len(stopped) == 1 and 2 <= stopped[0]["step"] < 10
    assert read_tracker(base / "run") == str(stopped[0]["step"])  # the preempted step is the newest checkpoint
    load_native(base / "run")  # complete: every file present and checksummed
    launch(2, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs2", timeout=200)
    assert _losses(base / "run") == straight_dp2[0]
    _same_params(base / "run", straight_dp2[1])


def _worker_pid(marker: str, local_rank: int, restart: int) -> int | None:
    """The pid of torchrun's worker `local_rank` in restart `restart` of the job tagged `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError):
            continue
        if (env.get("OMNICORE_TEST_JOB") == marker and env.get("LOCAL_RANK") == str(local_rank)
                and env.get("TORCHELASTIC_RESTART_COUNT") == str(restart)):  # fmt: skip
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_restarts_after_sigkills_finish_the_run_equal_to_uninterrupted(straight_dp2, tiny_hf, tmp_path):
    """torchrun --max-restarts 3; rank 1 SIGKILLed after step 3 and again after step 7: the job
    restarts twice from its newest checkpoints and ends with the uninterrupted run's parameters."""
    base = tmp_path / "job"
    job = _dp2_job(base, tiny_hf, 2)
    marker = uuid.uuid4().hex
    env = dict(os.environ, OMNICORE_TEST_JOB=marker, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT / "tests"), str(ROOT / "tests" / "data"), str(ROOT / "tests" / "train")]))  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=3", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "--monitor-interval=0.2", "tests/train/train_worker.py", json.dumps(job)]  # fmt: skip
    with open(tmp_path / "torchrun.log", "w") as out:
        agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            for restart, step in ((0, 3), (1, 7)):
                _wait_for_step(base / "run", step, [(agent, None)])
                pid = _worker_pid(marker, 1, restart)
                assert pid is not None, f"no rank 1 worker of restart {restart}"
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
            code = agent.wait(timeout=400)
        finally:
            if agent.poll() is None:
                agent.kill()
    assert code == 0, (tmp_path / "torchrun.log").read_text()[-4000:]
    restarts = [r["count"] for r in _records(base / "run") if r.get("event") == "restart"]
    assert restarts == [1, 2]
    assert _losses(base / "run") == straight_dp2[0]
    _same_params(base / "run", straight_dp2[1])
