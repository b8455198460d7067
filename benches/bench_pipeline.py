"""Pipeline schedules on p gloo processes (one per stage): bubble fraction and peak activation memory per stage.

Bubble: each stage's forward waits t_f and its backward 2 t_f (sleeps, so p processes on 2 cores measure
the schedule rather than core contention). Analytic, for 1F1B and GPipe alike: the step takes
(m + p - 1)(t_f + t_b), of which each stage works m (t_f + t_b), so the bubble is (p - 1) / (m + p - 1).
Measured: 1 - m (t_f + t_b) / wall, the wall time from the first stage's start to the last stage's end
(anything else - messages, Python, sleep overshoot - counts as bubble); also per stage 1 - busy / wall
(busy from the StageTrace; the training log prints the same, dividing by the longest stage's schedule) and
StageTrace.bubble, each stage's own window from the common start to its own end: stage s ends s backwards
before stage 0, so that reads 1 - m (t_f + t_b) / ((m + p - 1)(t_f + t_b) - s t_b), below the pipeline's
bubble for s > 0.
Memory: real matmul stages; peak bytes autograd holds for backward per stage. 1F1B keeps at most
p - s micro-batches in flight on stage s, GPipe all m.

    pytest benches/bench_pipeline.py -s                  # t_f = 50 ms, 3 repeats; asserts the bubble tolerance
    pytest benches/bench_pipeline.py -s --bench-quick    # t_f = 5 ms, 1 repeat; memory asserts only (CI)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "train"), str(ROOT / "benches")]

from common import thresholds, write_record  # noqa: E402
from dist_launch import launch  # noqa: E402

WORKER = ROOT / "benches" / "pipeline_worker.py"
MICRO = (4, 8)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"p{p}")
def stages(request, tmp_path_factory):
    """(p, t_f, the worker's result): one launch of p ranks measures every m and both schedules."""
    p, quick = request.param, request.config.getoption("--bench-quick")
    t_f, repeats = (0.005, 1) if quick else (0.05, 3)
    out = tmp_path_factory.mktemp(f"pipeline_p{p}")
    job = {"micro": MICRO, "t_f": t_f, "repeats": repeats, "out": str(out)}
    launch(p, [str(WORKER), json.dumps(job)], out / "logs", timeout=240)
    result = json.loads((out / "result.json").read_text())
    write_record(f"pipeline_p{p}", {"stages": p, **job, "results": result})
    return p, t_f, result


@pytest.mark.timeout(300)
def test_bubble_vs_analytic(stages, request):
    p, t_f, result = stages
    print(f"\np = {p}, t_f {t_f * 1e3:.0f} ms: bubble fraction, analytic (p-1)/(m+p-1) vs measured 1 - m(t_f+t_b)/wall; wall time "
          "beyond the analytic (m+p-1)(t_f+t_b); per stage 1 - busy/wall and the stage's own-window StageTrace.bubble")  # fmt: skip
    off = {}
    for key, per_stage in result.items():
        kind, m = key.split("/")
        analytic = (p - 1) / (int(m) + p - 1)
        measured = per_stage[0]["bubble"]  # the same wall time on every stage
        off[key] = measured - analytic
        busy = " ".join(f"{s['busy_bubble']:.3f}" for s in per_stage)
        own = " ".join(f"{s['own_bubble']:.3f}" for s in per_stage)
        excess = per_stage[0]["wall"] - (int(m) + p - 1) * 3 * t_f
        print(f"  {kind:5s} m={m}: analytic {analytic:.3f}  measured {measured:.3f} ({off[key]:+.3f})  excess {excess * 1e3:.0f} ms  "
              f"busy/wall [{busy}]  own [{own}]")  # fmt: skip
    if not request.config.getoption("--bench-quick"):
        tolerance = thresholds("pipeline")["bubble_abs_tolerance"]
        assert all(abs(d) <= tolerance for d in off.values()), f"p={p}: measured - analytic bubble {off}, tolerance {tolerance}"


@pytest.mark.timeout(300)
def test_activation_peak_1f1b_vs_gpipe(stages):
    p, _, result = stages
    print(f"\np = {p}: peak bytes saved for backward per stage (in micro-batches' activations), 1F1B vs GPipe")
    for m in MICRO:
        one, gpipe = result[f"1f1b/{m}"], result[f"gpipe/{m}"]
        for s in range(p):
            a = one[s]["per_micro"]
            print(f"  m={m} stage {s}: 1F1B {one[s]['peak_saved'] / 2**10:.0f} KiB ({one[s]['peak_saved'] / a:.1f})  "
                  f"GPipe {gpipe[s]['peak_saved'] / 2**10:.0f} KiB ({gpipe[s]['peak_saved'] / a:.1f})  "
                  f"ratio {one[s]['peak_saved'] / gpipe[s]['peak_saved']:.2f}")  # fmt: skip
            # Exact: every micro-batch saves the same storages, and all are released after its backward.
            assert one[s]["peak_saved"] == min(p - s, m) * a and gpipe[s]["peak_saved"] == m * a, (m, s, one[s], gpipe[s])
            assert one[s]["live_after"] == gpipe[s]["live_after"] == 0
        if m > p:
            assert one[0]["peak_saved"] < gpipe[0]["peak_saved"]
