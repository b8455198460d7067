"""A LoRA run under TP = 2 (gloo, spawned processes, timeout) equals one process: losses to 1e-6
relative, adapters within 2 % of one Adam step; each TP rank saves its own adapter pieces, and the
checkpoint continues under TP = 1 with its optimizer moments re-joined, equal to one process.
The same holds with hetero-parallel encoders (LLM TP 2, vision and audio TP 1: two encoder replicas,
each adapting the media of its half of the micro-batch)."""

from __future__ import annotations

import json

import pytest
from dist_launch import launch

from omnicore.checkpoint.lora_io import AdapterCheckpoint
from omnicore_dist.config import load_run_config
from omnicore_dist.run import run

ITERS = 3
LR = 2e-3  # train_worker.CONFIG's
LORA = ["--lora.targets=['all']", "--lora.r=4", "--lora.alpha=8", "--lora.towers=['llm', 'vision', 'audio']"]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def single(tiny_hf, tmp_path_factory):
    """The LoRA run in one process: its run folder."""
    import train_worker

    base = tmp_path_factory.mktemp("lora_tp1")
    (base / "run.toml").write_text(train_worker.CONFIG.format(hf=tiny_hf, iters=ITERS))
    run(load_run_config(base / "run.toml", LORA), base=base, samples=train_worker.samples())
    return base / "run"


HETERO = ["--parallel.vit_tp=1", "--parallel.audio_tp=1", "--data.micro_batch_size=2"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [[], HETERO], ids=["tp2", "tp2-encoders-tp1"])
def test_lora_tp2_run_equals_one_process_and_continues_under_tp1(single, layout, tiny_hf, tmp_path):
    import train_worker

    base = tmp_path / "tp2"
    job = {"hf": str(tiny_hf), "base": str(base), "iters": ITERS, "stop_after": ITERS - 1, "overrides": ["--parallel.tp=2", *LORA, *layout]}
    launch(2, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs")
    assert _losses(base / "run") == pytest.approx(_losses(single)[:-1], rel=1e-6)
    got = AdapterCheckpoint(base / "run")
    assert got.tp == 2 and {"lora-tp00-pp00.safetensors", "lora-tp01-pp00.safetensors"} <= set(got.meta["files"])
    trained = {k.split(".")[0] for k, v in got.params().items() if k.endswith("lora_B") and v.abs().max() > 0}
    assert trained == {"text", "vision", "audio"}

    # The last step under TP 1, in the same folder: adapters and their Adam moments re-joined from the
    # two TP pieces; the continuation is one process's (fresh moments would move them by far more).
    out = run(load_run_config(base / "run.toml", LORA), base=base, samples=train_worker.samples())
    assert out["step"] == ITERS
    assert _losses(base / "run")[-1] == pytest.approx(_losses(single)[-1], rel=1e-6)
    full, ref = AdapterCheckpoint(base / "run").params(), AdapterCheckpoint(single).params()
    for k, v in ref.items():
        assert (full[k] - v).abs().max() <= 0.02 * LR, k
