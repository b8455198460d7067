"""A whole run in one process: resume is exact (and real), frozen parts, bad steps, recompute, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from omnicore.checkpoint.commit import META
from omnicore.checkpoint.native import NativeCheckpoint, load_native
from omnicore.checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter, sha256_file
from omnicore.models.recompute import Recompute
from omnicore.models.thinker import init_thinker, thinker_token_losses
from omnicore_dist.config import ConfigError, load_run_config
from omnicore_dist.run import run
from omnicore_dist.train import BadStep

CONFIG = """
[model]
load = "{load}"

[data]
global_batch_size = 4
micro_batch_size = 2
seed = 3

[train]
train_iters = {iters}
lr = 2e-3
lr_warmup_iters = 1
weight_decay = 0.01
clip_grad = 1.0

[checkpoint]
save = "run"
save_interval = {interval}

[log]
progress = false
"""


def _config(tmp_path, load, iters=6, interval=3, extra=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.toml"
    path.write_text(CONFIG.format(load=load, iters=iters, interval=interval))
    return load_run_config(path, list(extra)), tmp_path


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "step" in r and "loss" in r}


def test_resume_is_exact_and_continues_from_the_next_step(tiny_hf, samples, tmp_path):
    cfg, base = _config(tmp_path / "straight", tiny_hf)
    run(cfg, base=base, samples=samples)
    straight = load_native(base / "run")[1]

    cfg, base = _config(tmp_path / "resumed", tiny_hf)
    run(cfg, base=base, samples=samples, stop_after=3)
    assert (base / "run" / "latest_checkpointed_iteration.txt").read_text() == "3"
    resumed_cfg, _ = _config(base, base / "run")
    out = run(resumed_cfg, base=base, samples=samples)
    assert out["step"] == 6
    steps = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines() if '"step"' in line and '"loss"' in line]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # no batch recomputed after the resume
    assert _losses(base / "run") == _losses(tmp_path / "straight" / "run")  # bit-identical losses
    final = load_native(base / "run")[1]
    assert all(torch.equal(final[k], straight[k]) for k in straight)


def _rewrite(step_dir, name, change):
    """Edit one saved file and fix its checksum in meta.json (a deliberate perturbation)."""
    f = SafetensorsFile(step_dir / name)
    tensors = {k: change(k, f.read(k)) for k in f.keys()}
    with SafetensorsWriter(step_dir / name, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    meta = json.loads((step_dir / META).read_text())
    meta["files"][name] = {"sha256": sha256_file(step_dir / name), "bytes": (step_dir / name).stat().st_size}
    (step_dir / META).write_text(json.dumps(meta))


@pytest.mark.parametrize("what", ["optimizer", "data position"])
def test_perturbing_the_saved_state_changes_the_continuation(tiny_hf, samples, tmp_path, what):
    cfg, base = _config(tmp_path, tiny_hf)
    run(cfg, base=base, samples=samples, stop_after=3)
    step_dir = base / "run" / "iter_0000003"
    if what == "optimizer":
        _rewrite(step_dir, "optim-tp00-pp00.safetensors", lambda k, v: v * 3 if k.startswith("exp_avg.") else v)
    else:
        data = json.loads((step_dir / "data.json").read_text())
        data["consumed_samples"] += 4
        (step_dir / "data.json").write_text(json.dumps(data))
        meta = json.loads((step_dir / META).read_text())
        meta["files"]["data.json"] = {"sha256": sha256_file(step_dir / "data.json"), "bytes": (step_dir / "data.json").stat().st_size}
        (step_dir / META).write_text(json.dumps(meta))
    reference, ref_base = _config(tmp_path / "ref", tiny_hf)
    run(reference, base=ref_base, samples=samples)
    resumed, _ = _config(base, base / "run")
    run(resumed, base=base, samples=samples)
    assert _losses(base / "run")[5] != _losses(ref_base / "run")[5]  # step 4 updates with the perturbed state


def test_resume_without_optimizer_state_says_it_is_inexact(tiny_hf, samples, tmp_path):
    cfg, base = _config(tmp_path, tiny_hf, extra=["--checkpoint.save_optim=false"])
    run(cfg, base=base, samples=samples, stop_after=3)
    assert "optimizer" in json.loads((base / "run" / "iter_0000003" / META).read_text())["lacks"]
    resumed, _ = _config(base, base / "run")
    run(resumed, base=base, samples=samples)
    assert "INEXACT resume, missing: optimizer" in (base / "run" / "log.txt").read_text()


def test_frozen_parts_get_no_update_and_no_optimizer_state(tiny_hf, samples, tmp_path):
    cfg, base = _config(tmp_path, tiny_hf, iters=2, interval=0, extra=['--model.freeze=["vision", "audio", "audio_proj"]'])
    run(cfg, base=base, samples=samples)
    before = load_native(base / "run")[1]  # compare against the HF start
    import omnicore

    _, start = omnicore.load_hf(tiny_hf)
    optim = SafetensorsFile(base / "run" / "iter_0000002" / "optim-tp00-pp00.safetensors").keys()
    assert not [k for k in optim if ".vision.blocks" in k or ".audio." in k]
    assert any(k.startswith("exp_avg.vision.merger.") for k in optim)  # the merger stays trainable
    assert torch.equal(before["vision.blocks.0.attn.q.weight"], start["vision.blocks.0.attn.q.weight"])
    assert not torch.equal(before["vision.merger.fc1.weight"], start["vision.merger.fc1.weight"])


def _poison(samples, index):
    """A sample whose audio features are NaN: its step's loss is NaN."""
    bad = [dict(s) for s in samples]
    victim = next(i for i, s in enumerate(bad) if "input_features" in s and i >= index)
    bad[victim] = dict(bad[victim], input_features=torch.full_like(bad[victim]["input_features"], float("nan")))
    return bad


def test_nan_loss_stops_with_the_last_checkpoint_intact(tiny_hf, samples, tmp_path):
    cfg, base = _config(tmp_path, tiny_hf, iters=8, interval=1, extra=["--data.shuffle=false"])
    poisoned = _poison(samples, 4)  # samples 4..7 form the second global batch without shuffling
    with pytest.raises(BadStep, match="non-finite loss"):
        run(cfg, base=base, samples=poisoned)
    assert (base / "run" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert NativeCheckpoint(base / "run", verify="all").meta["iteration"] == 1  # complete and verified
    assert not (base / "run" / "iter_0000002").exists()
    assert "stopped at step 2" in (base / "run" / "log.txt").read_text()


def test_skip_policy_skips_bounded_bad_steps(tiny_hf, samples, tmp_path):
    cfg, base = _config(tmp_path, tiny_hf, iters=4, interval=0, extra=["--data.shuffle=false", '--train.bad_step_policy="skip"'])
    run(cfg, base=base, samples=_poison(samples, 4))
    records = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines() if '"skipped"' in line]
    skipped = [r["step"] for r in records if r["skipped"]]
    assert skipped and all(r["skipped"] == (not math.isfinite(r["loss"])) for r in records)
    assert len(skipped) < len(records)


def test_recompute_gives_equal_gradients_with_fewer_saved_activations(samples):
    from omnicore.config import TINY
    from omnicore.data.collate import collate_packed

    params = {k: v.requires_grad_() for k, v in init_thinker(TINY, seed=1, std=0.2).items()}
    batch = collate_packed(samples[:5])
    results = []
    for recompute in (Recompute(), Recompute(text=range(3), vision=range(4), audio=range(2))):
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses, _ = thinker_token_losses(params, TINY, batch, recompute=recompute)
        grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
        results.append((saved[0], grads))
    (plain_bytes, plain), (re_bytes, re_grads) = results
    assert re_bytes < 0.6 * plain_bytes, (re_bytes, plain_bytes)
    for a, b in zip(plain, re_grads):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))


def test_bad_run_configs_are_named(tiny_hf, samples, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG.format(load=tiny_hf, iters=2, interval=0).replace("lr = 2e-3", "lrr = 2e-3"))
    with pytest.raises(ConfigError, match="unknown key train.lrr; did you mean train.lr"):
        load_run_config(path)
    cfg, base = _config(tmp_path, tiny_hf, extra=["--data.global_batch_size=5"])
    with pytest.raises(ConfigError, match="global_batch_size 5 is not divisible by data.micro_batch_size 2"):
        run(cfg, base=base, samples=samples)
    cfg, base = _config(tmp_path, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model.load: .*nowhere does not exist"):
        run(cfg, base=base, samples=samples)
    with pytest.raises(ConfigError, match="train.lr: expected float, got 'fast'"):
        load_run_config(_config(tmp_path, tiny_hf)[1] / "run.toml", ["--train.lr=fast"])
    cfg, base = _config(tmp_path, tiny_hf, iters=3, extra=["--train.lr_warmup_iters=10"])
    with pytest.raises(ConfigError, match=r"train.lr_\* / train.train_iters: warmup \(10.0 steps\) must end before decay_steps \(3\)"):
        run(cfg, base=base, samples=samples)
