"""Shared benchmark machinery: alternate timing of candidates in one process, ratio statistics, JSON records.

Ratios are the contract (absolute times change with hardware): each round times every candidate
once, in alternating order, so drift in machine load hits all of them alike.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
import tomllib
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


THRESHOLDS = Path(__file__).with_name("thresholds.toml")


def thresholds(section: str) -> dict[str, float]:
    """The speed-ratio gates of one benchmark, from benches/thresholds.toml (the one file that holds them)."""
    with THRESHOLDS.open("rb") as f:
        return tomllib.load(f)[section]


def check_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0, what: str = "") -> dict[str, float]:
    """Assert |got - want| <= atol + rtol * |want| (the correctness check that precedes any timing).

    Returns the max and mean absolute difference, which the failure message also prints.
    """
    diff = (got.double() - want.double()).abs()
    stats = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}
    ok = bool((diff <= atol + rtol * want.double().abs()).all())
    assert ok, (
        f"{what}: max abs diff {stats['max_abs_diff']:.3g}, mean {stats['mean_abs_diff']:.3g} (atol {atol:.3g}, rtol {rtol:.3g})"
    )
    return stats


def median(times: list[float]) -> float:
    return statistics.median(times)


def gate(summary: dict[str, float], threshold: float, *, quick: bool, what: str, within_noise: bool = False) -> None:
    """Assert the median speed ratio reaches `threshold`; with --bench-quick (CI) only correctness is asserted.

    `within_noise` is the reading of a "not slower" gate: the median may fall short of the threshold
    by half the interquartile range of the per-round ratios (slower by more than the noise fails).
    """
    if quick:
        return
    slack = summary["iqr"] / 2 if within_noise else 0.0
    assert summary["median"] + slack >= threshold, (
        f"{what}: median speed ratio {summary['median']:.3f} < {threshold}{' - IQR / 2' if within_noise else ''} "
        f"(min {summary['min']:.3f}, max {summary['max']:.3f}, IQR {summary['iqr']:.3f})"
    )


CONFIG_7B = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf_configs" / "qwen2_5_omni_7b.json"


def omni_7b():
    """The published Qwen2.5-Omni-7B thinker config (the shapes the op benchmarks use)."""
    from omnicore.config import load_config

    return load_config(CONFIG_7B)


def forward_backward(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor) -> Callable[[], tuple]:
    """A timing closure for one training step of `fn`: forward, then the gradients of every input."""

    def step():
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    return step


def time_and_gate_elementwise(benchmark, *, op: str, shape: str, dims, dtype: torch.dtype, backend_name: str, diffs: dict,
                              forward: dict[str, Callable[[], object]], steps: dict[str, Callable[[], object]], rounds: int,
                              threshold: float | None, quick: bool) -> dict:  # fmt: skip
    """The shared tail of the elementwise benches (norm, SwiGLU): time forward alone (no grad) and
    forward + backward, alternating reference and candidate; record, print, and gate the forward +
    backward ratio (`threshold` None: recorded only) with the within-noise rule."""
    with torch.no_grad():
        fwd = alternate(forward, rounds=rounds)
    fwd_bwd = alternate(steps, rounds=rounds)
    summaries = {"forward": ratio_summary(fwd["ref"], fwd["ops"]), "forward_backward": ratio_summary(fwd_bwd["ref"], fwd_bwd["ops"])}
    record = {
        "shape": list(dims),
        "dtype": str(dtype),
        "backend": backend_name,
        "correctness": diffs,
        "seconds_median": {f"{p}_{n}": median(t) for p, times in (("fwd", fwd), ("fwd_bwd", fwd_bwd)) for n, t in times.items()},
        "ops_vs_ref": summaries,
        "rounds": rounds,
    }
    benchmark.extra_info.update(record)
    benchmark.pedantic(steps["ops"], rounds=1, iterations=1)
    write_record(f"{op}_{shape}_{str(dtype).split('.')[-1]}", record)
    print(f"\n{op} {shape} {dtype}: " + ", ".join(f"{k} {s['median']:.2f}x (IQR {s['iqr']:.2f})" for k, s in summaries.items()))
    if threshold is not None:
        gate(summaries["forward_backward"], threshold, quick=quick, what=f"{op} {shape} {dtype} forward + backward", within_noise=True)
    return record


# The compute kernels of a training step: GEMMs, attention, convolutions. Any implementation runs
# them at its step's shapes (the same FLOPs), whichever library calls them; the rest (elementwise
# work, softmax, the optimizer, dispatch) is what an implementation can shrink.
KERNELS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::mkldnn_convolution", "aten::convolution_backward",
})  # fmt: skip


def kernel_seconds(step: Callable[[], object], calls: int = 2) -> float:
    """Seconds one call of `step` spends inside KERNELS (the least over `calls` profiled calls,
    after a warm-up): the floor of that step's time with these kernels. reference time / this
    bounds the speedup any candidate running the same kernels can reach."""
    from torch.profiler import ProfilerActivity, profile

    step()
    best = float("inf")
    for _ in range(calls):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        best = min(best, sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in KERNELS) / 1e6)
    return best


_PEAK_RSS = """
import re, sys
sys.path[:0] = {paths!r}
{setup}
step()
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark after the warm-up call
for _ in range(3):
    step()
print("PEAK", int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024)
"""


def peak_rss(setup: str) -> int:
    """Peak resident bytes of three calls of `step`, which the Python code `setup` defines, in a fresh
    process (benches/ and tests/ importable) after one warm-up call."""
    root = Path(__file__).resolve().parents[1]
    code = _PEAK_RSS.format(paths=[str(root / "benches"), str(root / "tests")], setup=setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True, cwd=root).stdout
    return int(out.split("PEAK")[1])
