"""Hetero parallel in whole runs: LLM TP 4 with vision / audio TP 1 (4 processes, gloo, timeouts)
trains with the losses of one process on micro-batches of 4 where two encoder replicas get no media;
its checkpoint stores each encoder once (not once per LLM TP rank), its parameter bytes per rank are
what the plan says (text split four ways, encoders whole), and it resumes in one process (and under
homogeneous TP 2) with the same continuation. Configuration errors name both sizes."""

from __future__ import annotations

import json

import pytest
import torch
from dist_launch import launch
from train_worker import LR, ONE_PROCESS_STEPS, step_losses

from omnicore.checkpoint.native import NativeCheckpoint, load_native
from omnicore.layout import rule_for, shard_shape, tower_of
from omnicore.models.thinker import param_shapes, tp_plans
from omnicore_dist.config import ConfigError, ParallelSection, load_run_config
from omnicore_dist.hetero import check_hetero
from omnicore_dist.run import run

ITERS = ONE_PROCESS_STEPS  # conftest's `single` run
HETERO = ["--parallel.tp=4", "--parallel.vit_tp=1", "--parallel.audio_tp=1", "--data.micro_batch_size=4"]


def _bytes(ckpt: NativeCheckpoint, prefix: str) -> int:
    return sum(f.tensors[n].nbytes for name, f in ckpt.files.items() if name.startswith(prefix) for n in f.tensors)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_hetero_tp4_encoders_tp1_equals_one_process_and_resumes_elsewhere(single, tiny_hf, tmp_path):
    import train_worker

    base = tmp_path / "hetero"
    job = {"hf": str(tiny_hf), "base": str(base), "iters": ITERS, "stop_after": 2, "overrides": HETERO}
    launch(4, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs", timeout=300)
    losses, params = single
    assert step_losses(base / "run") == pytest.approx(losses[:2], rel=1e-6)

    ckpt = NativeCheckpoint(base / "run")
    assert ckpt.meta["layout"]["tp"] == {"text": 4, "vision": 1, "audio": 1}
    files = set(ckpt.meta["files"])
    assert {f"text-tp{r:02d}-pp00.safetensors" for r in range(4)} <= files
    assert {"vision-tp00-pp00.safetensors", "audio-tp00-pp00.safetensors"} <= files
    assert not {f for f in files if f.startswith(("vision-tp01", "audio-tp01"))}  # stored once, not per LLM rank
    shapes, plans = param_shapes(ckpt.cfg), tp_plans(ckpt.cfg)
    for tower, size in (("text", 4), ("vision", 1), ("audio", 1)):  # bytes per rank as the plan says
        planned = sum(torch.Size(shard_shape(s, rule_for(n, plans[tower]), size, n)).numel() * 4 for n, s in shapes.items() if tower_of(n) == tower)
        full = sum(torch.Size(s).numel() * 4 for n, s in shapes.items() if tower_of(n) == tower)
        assert _bytes(ckpt, f"{tower}-tp00") == planned
        assert planned == full if size == 1 else planned < 0.3 * full

    for name, overrides in (("tp1", []), ("tp2", ["--parallel.tp=2", "--data.micro_batch_size=2"])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "resume.toml").write_text(train_worker.CONFIG.format(hf=base / "run", iters=ITERS))
        job = {"hf": str(base / "run"), "base": str(folder), "iters": ITERS, "overrides": overrides}
        if not overrides:
            run(load_run_config(folder / "resume.toml"), base=folder, samples=train_worker.samples())
        else:
            launch(2, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / f"logs-{name}", timeout=300)
        assert step_losses(folder / "run") == pytest.approx(losses[2:], rel=1e-6), name
        final = load_native(folder / "run")[1]
        for k, v in params.items():  # within 2 % of one Adam step (see tests/train/test_dp.py)
            assert (final[k] - v).abs().max() <= 0.02 * LR, (name, k)


def test_hetero_configuration_errors_name_both_sizes():
    with pytest.raises(ConfigError, match=r"data.micro_batch_size 2 is not divisible by the vision encoder's data-parallel size 4 "
                                          r"\(parallel.tp 4 / parallel.vit_tp 1\)"):  # fmt: skip
        check_hetero(ParallelSection(tp=4, vit_tp=1), micro_batch_size=2)
    with pytest.raises(ConfigError, match=r"parallel.audio_tp = 3 with parallel.tp = 4: an encoder's tensor-parallel size must divide"):
        check_hetero(ParallelSection(tp=4, audio_tp=3), micro_batch_size=4)
    with pytest.raises(ConfigError, match=r"parallel.vit_tp = 4 with parallel.tp = 2"):
        check_hetero(ParallelSection(tp=2, vit_tp=4), micro_batch_size=4)
    with pytest.raises(ConfigError, match=r"parallel.cp = 2: context parallelism is not built"):
        check_hetero(ParallelSection(tp=2, cp=2), micro_batch_size=4)
    with pytest.raises(ConfigError, match=r"parallel.vit_pp_layers \[1, 1\] spreads the vision encoder over several pipeline stages"):
        check_hetero(ParallelSection(tp=2, vit_tp=1, llm_pp_layers=(1, 1), vit_pp_layers=(1, 1)), micro_batch_size=2)
    assert check_hetero(ParallelSection(tp=4, vit_tp=2, audio_tp=1), micro_batch_size=4) == {"text": 4, "vision": 2, "audio": 1}
    assert check_hetero(ParallelSection(tp=2), micro_batch_size=1) == {"text": 2, "vision": 2, "audio": 2}  # homogeneous: no constraint
    assert check_hetero(ParallelSection(tp=4, vit_tp=1), micro_batch_size=None)["vision"] == 1  # token budget: any sample count


def test_run_rejects_an_undivisible_micro_batch_before_starting(tiny_hf, samples, tmp_path):
    import train_worker

    (tmp_path / "run.toml").write_text(train_worker.CONFIG.format(hf=tiny_hf, iters=1))
    cfg = load_run_config(tmp_path / "run.toml", ["--parallel.tp=2", "--parallel.vit_tp=1", "--data.micro_batch_size=1"])
    with pytest.raises(ConfigError, match="data.micro_batch_size 1 is not divisible by the vision encoder's data-parallel size 2"):
        run(cfg, base=tmp_path, samples=samples)
