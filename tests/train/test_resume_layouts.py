"""Exact resume under every parallel layout: 20 steps straight equal 10 steps, a save, a new launch
of the same job (which continues from the step-10 checkpoint) and 10 more steps. Losses and gradient
norms of all 20 steps, and the final parameters, are bit-identical (==, not approx) on CPU, for DP 2,
TP 2, PP 2, TP 2 x PP 2 and hetero TP 4 with encoders at TP 1 and 2 (spawned processes, gloo, timeouts).

Within one layout both runs do the same arithmetic in the same order, so any difference is state the
checkpoint fails to carry (weights, Adam moments and step count, learning-rate position, RNG, data
position), not rounding. Nothing in a full-model train step draws random numbers (no dropout), so
the RNG restore is not exercised here; the data position is (shuffled epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import train_worker
from dist_launch import launch

from omnicore.checkpoint.commit import read_tracker
from omnicore.checkpoint.native import NativeCheckpoint, load_native
from omnicore.checkpoint.safetensors_io import SafetensorsFile
from omnicore.data import StepSampler
from omnicore.layout import tower_of
from omnicore_dist.config import DataSection

ITERS, STOP = 20, 10

# name -> (world, run-config overrides); the tiny text tower has 3 layers, encoders stay on stage 0
LAYOUTS = {
    "dp2": (2, []),
    "tp2": (2, ["--parallel.tp=2"]),
    "pp2": (2, ["--parallel.llm_pp_layers=[1,2]"]),
    "tp2xpp2": (4, ["--parallel.tp=2", "--parallel.llm_pp_layers=[1,2]"]),
    # hetero: vision whole (4 replicas), audio in 2 pieces (2 replicas each); media on every replica
    "tp4_vit1_audio2": (4, ["--parallel.tp=4", "--parallel.vit_tp=1", "--parallel.audio_tp=2", "--data.micro_batch_size=4"]),
}


def _steps(run_dir: Path) -> list[dict]:
    """Each trained step's record (loss, grad_norm), in the order they were logged."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r and "step" in r and "event" not in r]


def _launch(world: int, job: dict, logs: Path) -> None:
    launch(world, ["tests/train/train_worker.py", json.dumps(job)], logs, timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ten_plus_ten_steps_in_two_launches_equal_twenty_straight(tiny_hf, tmp_path, layout):
    world, overrides = LAYOUTS[layout]
    # The same job for both runs (save every 10 steps), so the run config is identical. Shuffled: with
    # train_worker's 8 samples in order, step 11 (40 samples consumed) would get the batch of step 1
    # even from a resume that lost the data position; each epoch's own permutation tells them apart.
    job = {"hf": str(tiny_hf), "iters": ITERS, "overrides": [*overrides, "--data.shuffle=true", f"--checkpoint.save_interval={STOP}"]}
    order = StepSampler(n_samples=len(train_worker.samples()), global_batch=4, micro_batch=1, seed=DataSection().seed)  # CONFIG's batch
    assert order.global_indices(STOP * 4) != order.global_indices(0)

    straight = tmp_path / "straight"
    _launch(world, job | {"base": str(straight)}, tmp_path / "logs-straight")

    resumed = tmp_path / "resumed"
    _launch(world, job | {"base": str(resumed), "stop_after": STOP}, tmp_path / "logs-first")  # 10 steps, saved, processes end
    assert read_tracker(resumed / "run") == str(STOP)
    assert [r["step"] for r in _steps(resumed / "run")] == list(range(1, STOP + 1))
    _launch(world, job | {"base": str(resumed)}, tmp_path / "logs-second")  # a new launch of the same job continues

    resume_events = [json.loads(line) for line in (resumed / "run" / "metrics.jsonl").read_text().splitlines() if '"resume"' in line]
    assert [(e["step"], e["inexact"]) for e in resume_events] == [(STOP, [])]  # from step 10, nothing missing
    assert resume_events[0]["optimizer"] == "own files"  # each rank read only its own optimizer state
    if layout.startswith("tp4"):  # a hetero encoder's moments are saved by its pieces' first replicas only
        saved = NativeCheckpoint(resumed / "run", iteration=STOP).path
        towers = [{tower_of(k.split(".", 1)[1]) for k in SafetensorsFile(saved / f"optim-tp{r:02d}-pp00.safetensors").keys() if k != "step"} for r in range(4)]
        assert towers == [{"text", "vision", "audio"}, {"text", "audio"}, {"text"}, {"text"}]

    a, b = _steps(straight / "run"), _steps(resumed / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, ITERS + 1))  # no step trained twice
    for key in ("loss", "grad_norm"):
        want, got = [r[key] for r in a], [r[key] for r in b]
        diff = [(s + 1, x, y) for s, (x, y) in enumerate(zip(want, got)) if x != y]
        assert not diff, f"{layout}: {key} differs at (step, straight, resumed) {diff}"
    assert read_tracker(straight / "run") == read_tracker(resumed / "run") == str(ITERS)
    final_a, final_b = load_native(straight / "run")[1], load_native(resumed / "run")[1]
    assert final_a.keys() == final_b.keys()
    differing = [k for k in final_a if not torch.equal(final_a[k], final_b[k])]
    assert not differing, f"{layout}: final parameters differ: {differing[:5]}"
