"""A LoRA run under TP = 2 (gloo, spawned processes, timeout) equals one process: losses to 1e-6
relative, adapters within 2 % of one Adam step; each TP rank saves its own adapter pieces, and
the checkpoint reads back whole (and continues under TP = 1)."""

from __future__ import annotations

import json

import pytest
import torch
from dist_launch import launch

from omnicore.checkpoint.lora_io import AdapterCheckpoint
from omnicore_dist.config import load_run_config
from omnicore_dist.run import run

ITERS = 3
LR = 2e-3  # train_worker.CONFIG's
LORA = ["--lora.targets=['all']", "--lora.r=4", "--lora.alpha=8", "--lora.towers=['llm', 'vision', 'audio']"]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.timeout(300)
def test_lora_tp2_run_equals_one_process(tiny_hf, tmp_path):
    import train_worker

    single = tmp_path / "tp1"
    single.mkdir()
    (single / "run.toml").write_text(train_worker.CONFIG.format(hf=tiny_hf, iters=ITERS))
    run(load_run_config(single / "run.toml", LORA), base=single, samples=train_worker.samples())
    want = AdapterCheckpoint(single / "run")

    base = tmp_path / "tp2"
    job = {"hf": str(tiny_hf), "base": str(base), "iters": ITERS, "overrides": ["--parallel.tp=2", *LORA]}
    launch(2, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs")
    assert _losses(base / "run") == pytest.approx(_losses(single / "run"), rel=1e-6)
    got = AdapterCheckpoint(base / "run")
    assert got.tp == 2 and {"lora-tp00-pp00.safetensors", "lora-tp01-pp00.safetensors"} <= set(got.meta["files"])
    full, ref = got.params(), want.params()
    for k, v in ref.items():
        assert (full[k] - v).abs().max() <= 0.02 * LR, k
    assert any(v.abs().max() > 0 for k, v in full.items() if k.endswith("lora_B"))

    # The TP 2 adapters continue under TP 1 (fresh moments: re-splitting optimizer state is not built).
    (base / "run.toml").write_text(train_worker.CONFIG.format(hf=tiny_hf, iters=ITERS + 1))
    out = run(load_run_config(base / "run.toml", [*LORA, "--checkpoint.load_optim=false"]), base=base, samples=train_worker.samples())
    assert out["step"] == ITERS + 1
    assert torch.isfinite(torch.tensor(_losses(base / "run"))).all()
