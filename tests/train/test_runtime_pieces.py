"""Run config, launcher arguments, NPU environment, metrics and the dry-run plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omnicore_dist.config import ConfigError, RunConfig, load_run_config, parse_overrides, to_toml
from omnicore_dist.env import NPU_ENV, npu_env_defaults, report
from omnicore_dist.launch import parse_args, torchrun_command
from omnicore_dist.metrics import RunLog, StepRecord

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = '[model]\nload = "ckpt"\n[train]\ntrain_iters = 10\n'


def _write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_strict_config_suggests_the_nearest_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train\.lr_warmup_fractoin; did you mean train\.lr_warmup_fraction"):
        load_run_config(_write(tmp_path, MINIMAL + "lr_warmup_fractoin = 0.1\n"))
    with pytest.raises(ConfigError, match="unknown key trian"):
        load_run_config(_write(tmp_path, MINIMAL + "[trian]\nlr = 1.0\n"))
    with pytest.raises(ConfigError, match="missing required key.*model.load"):
        load_run_config(_write(tmp_path, "[model]\n[train]\ntrain_iters = 1\n"))
    with pytest.raises(ConfigError, match=r"train\.lr_decay_style: 'cosin' is not one of"):
        load_run_config(_write(tmp_path, MINIMAL + 'lr_decay_style = "cosin"\n'))
    with pytest.raises(ConfigError, match=r"model\.freeze: unknown part\(s\) \['visoin'\]"):
        load_run_config(_write(tmp_path, MINIMAL.replace('load = "ckpt"', 'load = "ckpt"\nfreeze = ["visoin"]')))
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_run_config(_write(tmp_path, "[model\n"))


def test_overrides_and_resolved_config_round_trip(tmp_path):
    cfg = load_run_config(_write(tmp_path, MINIMAL), ["--train.lr=3e-5", "--parallel.llm_pp_layers=[11, 17]", "--checkpoint.save=runs/x"])
    assert cfg.train.lr == 3e-5 and cfg.parallel.llm_pp_layers == (11, 17) and cfg.checkpoint.save == "runs/x"
    again = load_run_config(_write(tmp_path, to_toml(cfg)))
    assert again == cfg
    assert parse_overrides(["--a.b=word"]) == {"a": {"b": "word"}}
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        parse_overrides(["train.lr=1"])
    assert isinstance(cfg, RunConfig)


def test_launcher_takes_torchrun_flags_and_the_recipe_environment():
    env = {"NPUS_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}
    args, overrides = parse_args(["run.toml", "--train.lr=1e-5"], env)
    assert (args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr, args.master_port) == ("8", "2", "1", "10.0.0.1", "6000")
    cmd = torchrun_command(args, overrides, python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert "--nproc-per-node=8" in cmd and "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--master-addr=10.0.0.1" in cmd
    assert cmd[-3:] == ["omnicore_dist.launch", "run.toml", "--train.lr=1e-5"]
    args, _ = parse_args(["--nproc-per-node", "2", "--max-restarts", "3", "run.toml", "--dry-run"], {})
    cmd = torchrun_command(args, [])
    assert "--max-restarts=3" in cmd and cmd[-1] == "--dry-run" and "--node-rank=0" not in " ".join(cmd)


def test_npu_environment_defaults_respect_the_user():
    added = npu_env_defaults({"TASK_QUEUE_ENABLE": "1"})
    assert "TASK_QUEUE_ENABLE" not in added
    assert added["HCCL_CONNECT_TIMEOUT"] == "1200" and added["CPU_AFFINITY_CONF"] == "2"
    assert set(added) == set(NPU_ENV) - {"TASK_QUEUE_ENABLE"}
    assert npu_env_defaults({"HCCL_CONNECT_TIMEOUT": "600"}).get("HCCL_CONNECT_TIMEOUT") is None
    for bad in ("60", "9000", "ten"):
        with pytest.raises(ValueError, match="HCCL_CONNECT_TIMEOUT"):
            npu_env_defaults({"HCCL_CONNECT_TIMEOUT": bad})
    lo, hi = 120, 7200
    assert lo <= int(NPU_ENV["HCCL_CONNECT_TIMEOUT"][0]) <= hi


def test_env_report_names_versions_and_backend():
    lines = report({})
    assert any(line.startswith("torch ") for line in lines) and any(line.startswith("accelerator: ") for line in lines)
    out = subprocess.run([sys.executable, "-m", "omnicore_dist.env"], capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    assert "accelerator: cpu" in out


def _record(step, loss, **kw):
    base = dict(step=step, loss=loss, lr=1e-3, grad_norm=1.0, tokens=1000, samples=10, modality_tokens={"text": 900, "image": 100, "video": 0, "audio": 0},
                step_seconds=0.5, data_seconds=0.01, devices=2)  # fmt: skip
    return StepRecord(**(base | kw))


def test_run_log_writes_lines_jsonl_summary_and_plot(tmp_path):
    log = RunLog(tmp_path, enabled=True, interval=2, warmup_steps=2, total_steps=6, first_step=1, progress=False, tensorboard=False)
    for step in range(1, 7):
        log.step(_record(step, 5.0 - step * 0.5, step_seconds=10.0 if step <= 2 else 0.5))
    summary = log.summary()
    log.close()
    assert summary["measured_steps"] == 4 and summary["tokens_per_s"] == pytest.approx(2000.0)  # warm-up excluded
    assert summary["tokens_per_s_per_device"] == pytest.approx(1000.0)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["tokens_per_sample"] == 100.0 and "peak_memory_bytes" in lines[0]
    text = (tmp_path / "log.txt").read_text()
    assert "step 2 | loss 4.0000" in text and "step 1 |" not in text and "tokens text=900 image=100" in text
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with_mfu = _record(1, 1.0, flops=1e12, peak_flops_per_device=1e12).as_dict()
    assert with_mfu["mfu"] == pytest.approx(1.0)


def test_model_flops_counts_every_text_weight():
    import torch

    from omnicore.config import TINY
    from omnicore.models.thinker import param_shapes, prepare_inputs
    from omnicore_dist.train import model_flops

    batch = {"input_ids": torch.randint(0, 400, (1, 10)), "labels": torch.randint(0, 400, (1, 10))}
    t = TINY.text
    weights = sum(torch.Size(s).numel() for k, s in param_shapes(TINY).items() if k.startswith("text.layers.") and k.endswith("weight") and "norm" not in k)
    expected = 6 * weights * 10 + 6 * t.hidden * t.vocab_size * 9 + 6 * t.n_layers * t.hidden * 10 * 10
    assert model_flops(TINY, [prepare_inputs(TINY, batch)]) == expected


_DRY = """
import re, sys
sys.path[:0] = {paths!r}
import train_worker
from omnicore_dist.config import load_run_config
from omnicore_dist.run import run
from pathlib import Path
base = Path({base!r})
base.mkdir(parents=True, exist_ok=True)
(base / "run.toml").write_text(train_worker.CONFIG.format(hf={hf!r}, iters=3))
run(load_run_config(base / "run.toml"), base=base, samples=train_worker.samples(), dry_run={dry})
print("PEAK", int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024)
"""


def test_dry_run_plan_and_memory_estimate_within_25_percent(tiny_hf, tmp_path):
    paths = [str(ROOT / "tests"), str(ROOT / "tests" / "data"), str(ROOT / "tests" / "train"), str(ROOT / "examples")]
    outs = {}
    for dry in (True, False):
        code = _DRY.format(paths=paths, base=str(tmp_path / f"r{dry}"), hf=str(tiny_hf), dry=dry)
        outs[dry] = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, check=True).stdout
    plan = outs[True]
    assert "world 1: dp 1 x pp 1 x tp 1; 4 micro-batch(es) of 1 per rank per step" in plan
    assert "parameters per rank: 310,240" in plan and "sample 0 (tokens whose next token is trained on are in [brackets])" in plan
    assert not (tmp_path / "rTrue" / "run").exists()  # a dry run trains and writes nothing
    estimate = float(plan.split("total ")[1].split(" MiB")[0]) * 2**20
    peak = int(outs[False].split("PEAK")[1])
    assert abs(estimate - peak) <= 0.25 * peak, f"estimate {estimate / 2**20:.0f} MiB vs measured peak {peak / 2**20:.0f} MiB"


def test_local_device_binds_the_node_local_chip(monkeypatch):
    """torchrun's LOCAL_RANK (not the global rank) picks the chip, and it is made current before
    NCCL/HCCL start: a communicator binds to the current device."""
    import torch

    from omnicore_dist import mesh

    bound = []
    monkeypatch.setattr(mesh, "accelerator", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert mesh.local_device() == torch.device("cuda", 2)
    assert bound == [torch.device("cuda", 2)]
    monkeypatch.setattr(mesh, "accelerator", lambda: "cpu")
    assert mesh.local_device() == torch.device("cpu")
