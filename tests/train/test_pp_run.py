"""Pipeline-parallel runs (gloo, spawned processes, timeouts) train like one process: losses to 1e-6
relative and final weights within 2 % of one Adam step (see tests/train/test_dp.py), every stage
saving only its own files, and a save under one layout resuming under another (PP x TP x DP =
2 x 2 x 2 -> 4 x 1 x 2, and PP 2 -> one process). A stage holding only frozen encoders trains
without optimizer work, and the run logs each stage's step time and bubble fraction."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from dist_launch import ROOT, free_port, launch
from train_worker import ONE_PROCESS_STEPS, assert_within_one_adam_step, step_losses

from omnicore.checkpoint.hf import load_hf
from omnicore.checkpoint.native import NativeCheckpoint, load_native
from omnicore.layout import Layout, LayoutError
from omnicore.models.thinker import tower_depths
from omnicore_dist.config import ConfigError, load_run_config
from omnicore_dist.pipeline import stage_lines
from omnicore_dist.run import run

ITERS = ONE_PROCESS_STEPS  # conftest's `single` run
ENCODERS_FIRST = ["--parallel.llm_pp_layers=[0,3]", "--parallel.vit_pp_layers=[4,0]", "--parallel.audio_pp_layers=[2,0]"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lists, message", [
    (["--parallel.llm_pp_layers=[1,2]", "--parallel.vit_pp_layers=[2,2]"],
     r"vit_pp_layers \[2, 2\] with llm_pp_layers \[1, 2\]: the vision encoder ends on stage 1 but the LLM starts on stage 0"),
    (["--parallel.llm_pp_layers=[1,1]"], r"llm_pp_layers \[1, 1\] sums to 2, but the text tower has 3 layers"),
    (["--parallel.llm_pp_layers=[1,2]", "--parallel.audio_pp_layers=[2]"], r"audio_pp_layers \[2\] has 1 entries; llm_pp_layers has 2"),
])  # fmt: skip
def test_impossible_layer_lists_fail_before_any_weight_is_read(tiny_hf, tmp_path, monkeypatch, lists, message):
    import train_worker

    import omnicore_dist.run as run_module

    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("weights were read before the layout was checked"))
    (tmp_path / "run.toml").write_text(train_worker.CONFIG.format(hf=tiny_hf, iters=1))
    with pytest.raises(LayoutError, match=message):
        run(load_run_config(tmp_path / "run.toml", lists), base=tmp_path, samples=train_worker.samples())
    with pytest.raises(ConfigError, match="pipeline_schedule"):
        load_run_config(tmp_path / "run.toml", ["--parallel.pipeline_schedule='interleaved'"])


def test_the_plan_names_what_each_stage_holds(tiny_hf):
    from omnicore.config import load_config

    stages = Layout(llm_pp_layers=(0, 0, 1, 2), vit_pp_layers=(2, 2, 0, 0), audio_pp_layers=(0, 1, 1, 0)).stages(tower_depths(load_config(tiny_hf)))
    assert stage_lines(stages, "1f1b") == [
        "pipeline: 4 stages, 1f1b schedule",
        "  stage 0: vision blocks 0-1",
        "  stage 1: vision blocks 2-3, audio layers 0",
        "  stage 2: audio layers 1, merge + token embedding, LLM layers 0",
        "  stage 3: LLM layers 1-2, final norm + lm_head",
    ]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pp2_with_an_encoder_only_first_stage_equals_one_process_and_resumes_in_one(single, tiny_hf, tmp_path):
    import train_worker

    base = tmp_path / "pp2"
    job = {"hf": str(tiny_hf), "base": str(base), "iters": ITERS, "stop_after": 2, "overrides": ENCODERS_FIRST + ["--log.warmup_steps=0"]}
    launch(2, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs", timeout=300)
    losses, params = single
    assert step_losses(base / "run") == pytest.approx(losses[:2], rel=1e-6)

    ckpt = NativeCheckpoint(base / "run")
    files = set(ckpt.meta["files"])
    assert ckpt.meta["pp_size"] == 2 and ckpt.meta["layout"]["pp"]["llm_pp_layers"] == [0, 3]
    assert {"vision-tp00-pp00.safetensors", "audio-tp00-pp00.safetensors", "text-tp00-pp01.safetensors"} <= files
    assert not {"text-tp00-pp00.safetensors", "vision-tp00-pp01.safetensors"} & files  # each stage writes its own parameters only
    assert {"optim-tp00-pp00.safetensors", "optim-tp00-pp01.safetensors"} <= files
    pipeline = [r for r in _records(base / "run") if r.get("event") == "pipeline"]
    assert len(pipeline) == 1 and [s["stage"] for s in pipeline[0]["stages"]] == [0, 1]
    assert all(0.0 <= s["bubble"] < 1.0 and s["step_seconds"] > 0 for s in pipeline[0]["stages"])

    # The third step in one process, from the PP 2 checkpoint (weights and optimizer re-joined).
    folder = tmp_path / "resume"
    folder.mkdir()
    (folder / "run.toml").write_text(train_worker.CONFIG.format(hf=base / "run", iters=ITERS))
    run(load_run_config(folder / "run.toml"), base=folder, samples=train_worker.samples())
    assert step_losses(folder / "run") == pytest.approx(losses[2:], rel=1e-6)
    assert_within_one_adam_step(load_native(folder / "run")[1], params)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pp2_tp2_dp2_equals_one_process_and_resumes_as_pp4_tp1_dp2(single, tiny_hf, tmp_path):
    losses, params = single
    base = tmp_path / "pp2tp2dp2"
    job = {"hf": str(tiny_hf), "base": str(base), "iters": ITERS, "stop_after": 2,
           "overrides": ["--parallel.tp=2", "--parallel.llm_pp_layers=[1,2]"]}  # fmt: skip
    launch(8, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs", timeout=500)
    assert step_losses(base / "run") == pytest.approx(losses[:2], rel=1e-6)
    ckpt = NativeCheckpoint(base / "run")
    assert (ckpt.meta["tp_size"], ckpt.meta["pp_size"], ckpt.meta["dp_size"]) == (2, 2, 2)

    folder = tmp_path / "pp4"
    pp4 = ["--parallel.llm_pp_layers=[0,1,1,1]", "--parallel.vit_pp_layers=[4,0,0,0]", "--parallel.audio_pp_layers=[2,0,0,0]",
           "--parallel.pipeline_schedule=gpipe"]  # fmt: skip
    job = {"hf": str(base / "run"), "base": str(folder), "iters": ITERS, "overrides": pp4}
    launch(8, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs-pp4", timeout=500)
    log = (folder / "run" / "log.txt").read_text()
    assert "resumed from" in log and "INEXACT" not in log  # the new stages have no RNG file, but no step draws random numbers
    assert "optimizer state: re-cut from the saved layout" in log
    assert step_losses(folder / "run") == pytest.approx(losses[2:], rel=1e-6)
    assert_within_one_adam_step(load_native(folder / "run")[1], params)


FROZEN_ENCODERS = "--model.freeze=['vision', 'vision_merger', 'audio', 'audio_proj']"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_with_a_frozen_encoder_stage_match_one_process(tmp_path):
    """Two launchers (`--nnodes 2`, one process each, as two hosts would run them) train the demo
    with PP 2 whose first stage holds only frozen encoders (no optimizer work there); the losses are
    one process's and the encoders come out unchanged."""
    demo = tmp_path / "demo"
    subprocess.run([sys.executable, "examples/make_demo.py", "--out", str(demo)], cwd=ROOT, check=True, timeout=120)
    common = [f"--model.load={demo / 'model'}", f"--data.config={demo / 'data.json'}", "--train.train_iters=3", "--train.lr_warmup_iters=1", "--checkpoint.export_hf=''",
              "--checkpoint.save_interval=0", "--log.progress=false", FROZEN_ENCODERS]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "omnicore_dist.launch", "examples/demo.toml", *common, f"--checkpoint.save={tmp_path / 'one'}"],
                   cwd=ROOT, check=True, timeout=240, env=env)  # fmt: skip
    port = str(free_port())
    nodes = [
        subprocess.Popen([sys.executable, "-m", "omnicore_dist.launch", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                          "--master-addr", "127.0.0.1", "--master-port", port, "examples/demo.toml", *common, *ENCODERS_FIRST,
                          f"--checkpoint.save={tmp_path / 'two'}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=400)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(tmp_path / "one"), rel=1e-6)
    initial, after, one = load_hf(demo / "model")[1], load_native(tmp_path / "two")[1], load_native(tmp_path / "one")[1]
    assert NativeCheckpoint(tmp_path / "two").meta["pp_size"] == 2
    for name, value in after.items():
        assert (value - one[name]).abs().max() <= 0.02 * 3e-3, name  # within 2 % of one Adam step (demo.toml's lr)
        if name.startswith(("vision.", "audio.")):
            assert torch.equal(value, initial[name]), name  # frozen


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lora_pp2_equals_one_process_and_continues_in_one(tiny_hf, tmp_path):
    """LoRA on every tower with PP 2: losses of one process, adapters within 2 % of one Adam step,
    each stage saving its own adapters; one process continues from them with the saved moments."""
    import train_worker
    from test_lora_tp_run import LORA

    from omnicore.checkpoint.lora_io import AdapterCheckpoint

    single = tmp_path / "one"
    single.mkdir()
    (single / "run.toml").write_text(train_worker.CONFIG.format(hf=tiny_hf, iters=ITERS))
    run(load_run_config(single / "run.toml", LORA), base=single, samples=train_worker.samples())

    base = tmp_path / "pp2"
    job = {"hf": str(tiny_hf), "base": str(base), "iters": ITERS, "stop_after": 2, "overrides": ["--parallel.llm_pp_layers=[1,2]", *LORA]}
    launch(2, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs", timeout=300)
    assert step_losses(base / "run") == pytest.approx(step_losses(single / "run")[:2], rel=1e-6)
    got = AdapterCheckpoint(base / "run")
    assert got.pp == 2 and {"lora-tp00-pp00.safetensors", "lora-tp00-pp01.safetensors"} <= set(got.meta["files"])
    assert set(got.params()) == set(AdapterCheckpoint(single / "run").params())

    out = run(load_run_config(base / "run.toml", LORA), base=base, samples=train_worker.samples())  # the same folder: continues
    assert out["step"] == ITERS
    assert step_losses(base / "run")[-1] == pytest.approx(step_losses(single / "run")[-1], rel=1e-6)
    full, ref = AdapterCheckpoint(base / "run").params(), AdapterCheckpoint(single / "run").params()
    assert_within_one_adam_step(full, ref)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_hetero_encoders_on_their_own_stage_equal_one_process(single, tiny_hf, tmp_path):
    """PP 2 x LLM TP 2 with vision / audio at TP 1 (two encoder replicas on the encoder-only stage 0)."""
    base = tmp_path / "hetero"
    overrides = ["--parallel.tp=2", "--parallel.vit_tp=1", "--parallel.audio_tp=1", "--data.micro_batch_size=2", *ENCODERS_FIRST]
    job = {"hf": str(tiny_hf), "base": str(base), "iters": ITERS, "overrides": overrides}
    launch(4, ["tests/train/train_worker.py", json.dumps(job)], tmp_path / "logs", timeout=300)
    losses, params = single
    assert step_losses(base / "run") == pytest.approx(losses, rel=1e-6)
    files = set(NativeCheckpoint(base / "run").meta["files"])
    assert {"vision-tp00-pp00.safetensors", "text-tp01-pp01.safetensors"} <= files and "vision-tp01-pp00.safetensors" not in files
    assert_within_one_adam_step(load_native(base / "run")[1], params)
