"""Validation loss during training: the right samples, once each, at the right steps, equal to the
loss of the saved weights; DP 2 and TP 2 report the single-process values (1e-6 relative)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_launch import launch

from omnicore.checkpoint.native import load_native
from omnicore.eval import validation_loss
from omnicore.data.collate import collate_packed
from omnicore.models.thinker import thinker_token_losses
from omnicore_dist.config import ConfigError, load_run_config
from omnicore_dist.run import run
from omnicore_dist.validate import validation_groups

ITERS = 3
ROOT = Path(__file__).resolve().parents[2]
RUN_ON_DATA = """
[model]
load = "{model}"
[data]
config = "{data}"
seq_length = 256
global_batch_size = 2
micro_batch_size = 2
[train]
train_iters = 1
[eval]
interval = 1
[checkpoint]
save = "run"
[log]
progress = false
"""


def _validations(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("event") == "validation"}


@pytest.mark.parametrize("n, limit, micro, dp", [(5, 100, 1, 2), (7, 100, 2, 2), (9, 6, 2, 3), (3, 100, 2, 4), (8, 8, 4, 1)])
def test_validation_groups_score_each_sample_once(n, limit, micro, dp):
    groups = [validation_groups(n, limit=limit, micro_batch=micro, dp_size=dp, dp_rank=r) for r in range(dp)]
    scored = sorted(i for rank in groups for mb in rank for i in mb)
    assert scored == list(range(min(n, limit)))
    assert all(len(mb) <= micro for rank in groups for mb in rank)
    sizes = [len(rank) for rank in groups]
    assert max(sizes) - min(sizes) <= 1  # round-robin: ranks differ by at most one micro-batch


@pytest.fixture(scope="module")
def single(tiny_hf, tmp_path_factory):
    """One process: validation every 2 steps of 3 (so at 2 and after the last, 3), checkpoints at both."""
    import train_worker

    base = tmp_path_factory.mktemp("val1")
    (base / "run.toml").write_text(train_worker.CONFIG.format(hf=tiny_hf, iters=ITERS))
    cfg = load_run_config(base / "run.toml", train_worker.EVAL_OVERRIDES + ["--checkpoint.save_interval=2"])
    summary = run(cfg, base=base, samples=train_worker.samples(), val_samples=train_worker.val_samples())
    return _validations(base / "run"), summary, base / "run"


def test_validation_runs_at_the_interval_and_after_the_last_step(single):
    validations, summary, _ = single
    assert sorted(validations) == [2, 3]
    assert summary["final_val_loss"] == validations[3]["val_loss"]
    assert validations[2]["val_loss"] != validations[3]["val_loss"]  # the weights changed in between


def test_validation_loss_is_the_saved_weights_loss_on_every_sample(single):
    import train_worker

    validations, _, run_dir = single
    held_out = train_worker.val_samples()
    for step, row in validations.items():
        cfg, params = load_native(run_dir, iteration=step)[:2]
        losses = [thinker_token_losses(params, cfg, collate_packed([s]))[0] for s in held_out]
        expected = torch.cat(losses).double()
        assert row["val_samples"] == len(held_out)
        assert row["val_targets"] == expected.numel()
        assert row["val_loss"] == pytest.approx(float(expected.mean()), rel=1e-6)
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-9)


def test_eval_iters_caps_the_scored_samples(tiny_hf, tmp_path):
    import train_worker

    (tmp_path / "run.toml").write_text(train_worker.CONFIG.format(hf=tiny_hf, iters=1))
    # global batch 4 x 1 iter: the first 4 of the 5 validation samples
    cfg = load_run_config(tmp_path / "run.toml", ["--eval.interval=1", "--eval.iters=1"])
    run(cfg, base=tmp_path, samples=train_worker.samples(), val_samples=train_worker.val_samples())
    row = _validations(tmp_path / "run")[1]
    cfg_m, params = load_native(tmp_path / "run")[:2]
    first4 = validation_loss(params, cfg_m, [collate_packed([s]) for s in train_worker.val_samples()[:4]])
    assert row["val_samples"] == 4 and row["val_targets"] == first4.targets
    assert row["val_loss"] == pytest.approx(first4.mean, rel=1e-6)


def test_eval_without_validation_samples_is_a_clear_error(tiny_hf, tmp_path):
    import train_worker

    (tmp_path / "run.toml").write_text(train_worker.CONFIG.format(hf=tiny_hf, iters=1))
    cfg = load_run_config(tmp_path / "run.toml", ["--eval.interval=1"])
    with pytest.raises(ConfigError, match="no validation samples.*val_rate"):
        run(cfg, base=tmp_path, samples=train_worker.samples())
    for bad, match in (("--eval.interval=-1", "eval.interval must be >= 0"), ("--eval.iters=0", "eval.iters must be >= 1"),
                       ("--eval.every=2", "unknown key eval.every")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            load_run_config(tmp_path / "run.toml", [bad])


def test_validation_split_from_the_data_config(tmp_path):
    """The demo's data config with MindSpeed's `val_rate`: a validation cache is built and scored."""
    demo = tmp_path / "demo"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_demo.py"), "--out", str(demo)], check=True, timeout=120)
    data = json.loads((demo / "data.json").read_text())
    data["dataset_param"]["basic_parameters"]["val_rate"] = 0.25
    (demo / "data_val.json").write_text(json.dumps(data))
    (demo / "run.toml").write_text(RUN_ON_DATA.format(model=demo / "model", data=demo / "data_val.json"))
    run(load_run_config(demo / "run.toml"), base=demo)
    row = _validations(demo / "run")[1]
    assert row["val_samples"] >= 1 and row["val_targets"] > 0 and math.isfinite(row["val_loss"])
    assert len(list((demo / "cache").iterdir())) >= 2  # a training and a validation cache


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout", [["--parallel.tp=1"], ["--parallel.tp=2"], ["--parallel.llm_pp_layers=[1,2]"]], ids=["dp2", "tp2", "pp2"])
def test_validation_under_dp2_tp2_and_pp2_equals_one_process(single, tiny_hf, tmp_path, layout):
    """DP 2 scores 3 + 2 of the 5 samples (uneven ranks); TP 2 scores all 5 with split weights; PP 2
    runs them forward through two stages (the first reads them, the last scores them)."""
    job = {"hf": str(tiny_hf), "base": str(tmp_path / "job"), "iters": ITERS, "val": True, "overrides": layout}
    launch(2, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs", timeout=300)
    got = _validations(tmp_path / "job" / "run")
    expected = single[0]
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step]["val_targets"] == expected[step]["val_targets"]
        assert got[step]["val_loss"] == pytest.approx(expected[step]["val_loss"], rel=1e-6)
