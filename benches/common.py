"""Shared benchmark machinery: alternate timing of candidates in one process, ratio statistics, JSON records.

Ratios are the contract (absolute times change with hardware): each round times every candidate
once, in alternating order, so drift in machine load hits all of them alike.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "bench_results"


def alternate(candidates: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each candidate over `rounds` rounds, order flipped every round."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_summary(reference: list[float], candidate: list[float]) -> dict[str, float]:
    """Per-round speed ratios reference / candidate: median and the spread (min, max, IQR)."""
    ratios = sorted(r / c for r, c in zip(reference, candidate))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1], "iqr": q[2] - q[0]}


def machine() -> dict[str, object]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


def write_record(name: str, record: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **record}, indent=2))
    return path
