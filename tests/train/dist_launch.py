"""Start N ranks of a test worker as separate processes (env:// rendezvous on a free port), with a
timeout that fails naming the ranks still running and shows their output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(world: int, args: list[str], logs: Path, *, extra_paths: list[str] = ()) -> list[tuple[subprocess.Popen, object]]:
    """Start the ranks (each with its log file under `logs`); `finish` waits for them."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT / "tests" / "data"),
                   str(ROOT / "tests" / "train"), str(ROOT / "examples"), *extra_paths]))  # fmt: skip
        out = open(logs / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT), out))
    return procs


def finish(procs: list[tuple[subprocess.Popen, object]], logs: Path, *, timeout: float = 240) -> None:
    """Wait for every rank; kill and fail (naming the ranks, with their output) on a timeout or a failure."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    stuck = [r for r, (p, _) in enumerate(procs) if p.poll() is None]
    for p, out in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        out.close()
    failed = [r for r, (p, _) in enumerate(procs) if p.returncode != 0]
    if stuck or failed:
        tails = "\n".join(f"--- rank {r}\n" + (logs / f"rank{r}.log").read_text()[-3000:] for r in range(len(procs)))
        what = f"ranks {stuck} still running after {timeout:.0f} s" if stuck else f"ranks {failed} failed"
        raise AssertionError(f"{what}\n{tails}")


def launch(world: int, args: list[str], logs: Path, *, timeout: float = 240, extra_paths: list[str] = ()) -> None:
    finish(start(world, args, logs, extra_paths=extra_paths), logs, timeout=timeout)
