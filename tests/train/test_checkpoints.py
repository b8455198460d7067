"""Training checkpoints: rotation, choosing an iteration, HF export at the end, bf16 training, and
kills inside a save never leaving a partial checkpoint as the one that loads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import omnicore
from omnicore.checkpoint.commit import META
from omnicore.checkpoint.native import NativeCheckpoint, load_native
from omnicore_dist.config import load_run_config
from omnicore_dist.run import run

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
[model]
load = "{load}"
{model_extra}
[data]
global_batch_size = 2
micro_batch_size = 1
[train]
train_iters = {iters}
lr = 1e-3
[checkpoint]
save = "run"
save_interval = 1
{ckpt_extra}
[log]
progress = false
"""


def _cfg(base, load, iters=4, model_extra="", ckpt_extra="", overrides=()):
    base.mkdir(parents=True, exist_ok=True)
    (base / "run.toml").write_text(CONFIG.format(load=load, iters=iters, model_extra=model_extra, ckpt_extra=ckpt_extra))
    return load_run_config(base / "run.toml", list(overrides))


def test_keep_last_rotation_keeps_the_newest(tiny_hf, samples, tmp_path):
    run(_cfg(tmp_path, tiny_hf, ckpt_extra="keep_last = 2"), base=tmp_path, samples=samples)
    kept = sorted(p.name for p in (tmp_path / "run").glob("iter_*"))
    assert kept == ["iter_0000003", "iter_0000004"]
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_iteration_is_chosen_by_flag_or_by_editing_the_tracker(tiny_hf, samples, tmp_path):
    run(_cfg(tmp_path, tiny_hf, iters=3), base=tmp_path, samples=samples)
    second = load_native(tmp_path / "run", iteration=2)[1]
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("2\n")
    assert NativeCheckpoint(tmp_path / "run").meta["iteration"] == 2
    resumed = tmp_path / "resumed"
    cfg = _cfg(resumed, tmp_path / "run", iters=3, model_extra="iteration = 1")
    out = run(cfg, base=resumed, samples=samples)
    assert out["step"] == 3
    log = (resumed / "run" / "log.txt").read_text()
    assert "at step 1" in log
    assert not torch.equal(second["text.norm.weight"], load_native(tmp_path / "run", iteration=1)[1]["text.norm.weight"])


def test_export_hf_at_the_end_keeps_everything(tiny_hf, samples, tmp_path):
    cfg = _cfg(tmp_path, tiny_hf, iters=2, ckpt_extra='export_hf = "exported"')
    run(cfg, base=tmp_path, samples=samples)
    _, exported = omnicore.load_hf(tmp_path / "exported")
    _, trained = load_native(tmp_path / "run")
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert (tmp_path / "exported" / "config.json").read_bytes() == (tiny_hf / "config.json").read_bytes()


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_bf16_parameters_train_with_fp32_masters(tiny_hf, samples, tmp_path):
    """bf16 weights and compute with fp32 master weights follow the fp32 run within 2 %."""
    run(_cfg(tmp_path / "fp32", tiny_hf, iters=3), base=tmp_path / "fp32", samples=samples)
    run(_cfg(tmp_path, tiny_hf, iters=3, overrides=['--model.dtype="bf16"']), base=tmp_path, samples=samples)
    assert _losses(tmp_path / "run") == pytest.approx(_losses(tmp_path / "fp32" / "run"), rel=0.02)
    ckpt = NativeCheckpoint(tmp_path / "run")
    assert ckpt.dtype("text.layers.0.attn.q.weight") == torch.bfloat16
    from omnicore.checkpoint.safetensors_io import SafetensorsFile

    optim = SafetensorsFile(ckpt.path / "optim-tp00-pp00.safetensors")
    assert optim.tensors["master.text.layers.0.attn.q.weight"].dtype == torch.float32


_SAVE_LOOP = """
import sys
sys.path[:0] = {paths!r}
from pathlib import Path
from omnicore_dist.config import load_run_config
from omnicore_dist.run import run
import train_worker
base = Path({base!r})
run(load_run_config(base / "run.toml"), base=base, samples=train_worker.samples())
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kills_inside_saves_never_expose_a_partial_checkpoint(tiny_hf, tmp_path):
    """SIGKILL at several instants while saves are running: the loadable checkpoint is always complete."""
    paths = [str(ROOT / "tests"), str(ROOT / "tests" / "data"), str(ROOT / "tests" / "train"), str(ROOT / "examples")]
    loaded_ok = 0
    for i, delay in enumerate((0.0, 0.03, 0.1)):  # tests/train/test_kill_during_save.py kills inside saves at many more instants
        base = tmp_path / f"k{i}"
        _cfg(base, tiny_hf, iters=40)
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP.format(paths=paths, base=str(base))], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 240
        target = 2 + i  # kill during the save of iteration `target`
        while not (base / "run" / f".tmp-iter_{target:07d}").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        ckpt = NativeCheckpoint(base / "run", verify="all")  # every file's size and sha256
        assert ckpt.meta["iteration"] in (target - 1, target)
        for step_dir in (base / "run").glob("iter_*"):  # every visible step folder is complete
            assert (step_dir / META).exists()
            NativeCheckpoint(step_dir, verify="all")
        loaded_ok += 1
    assert loaded_ok == 3
