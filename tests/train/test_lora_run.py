"""LoRA runs in one process: only adapters train and are saved, resume is exact, a wrong base is
refused, and the end-of-run exports (merged HF folder, PEFT folder) carry the trained adapters."""

from __future__ import annotations

import json

import pytest
import torch

import omnicore
from omnicore.checkpoint.commit import META
from omnicore.checkpoint.lora_io import AdapterCheckpoint, base_fingerprint, read_peft_adapter
from omnicore.checkpoint.safetensors_io import SafetensorsFile
from omnicore.lora import adapted
from omnicore_dist.config import ConfigError, load_run_config
from omnicore_dist.run import run

CONFIG = """
[model]
load = "{load}"

[data]
global_batch_size = 4
micro_batch_size = 2
seed = 3

[train]
train_iters = {iters}
lr = 5e-3
lr_warmup_iters = 1
weight_decay = 0.01
clip_grad = 1.0

[checkpoint]
save = "run"
save_interval = 2

[lora]
targets = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
r = 4
alpha = 8
towers = ["llm", "vision", "audio"]

[log]
progress = false
"""


def _config(folder, load, iters=4, extra=()):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.toml"
    path.write_text(CONFIG.format(load=load, iters=iters))
    return load_run_config(path, list(extra)), folder


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "step" in r and "loss" in r}


def test_lora_run_saves_only_adapters_resumes_exactly_and_exports(tiny_hf, samples, tmp_path):
    extra = [f"--checkpoint.export_hf={tmp_path / 'merged'}", f"--lora.export_peft={tmp_path / 'peft'}"]
    cfg, base = _config(tmp_path / "straight", tiny_hf, extra=extra)
    run(cfg, base=base, samples=samples)
    straight = AdapterCheckpoint(base / "run")
    assert straight.meta["iteration"] == 4
    assert straight.base == base_fingerprint(tiny_hf)
    files = set(straight.meta["files"])
    assert "lora-tp00-pp00.safetensors" in files and "optim-tp00-pp00.safetensors" in files
    assert not [f for f in files if f.startswith(("text-", "vision-", "audio-"))], "the frozen base was saved"
    optim = SafetensorsFile(straight.path / "optim-tp00-pp00.safetensors").keys()
    assert {k.split(".", 1)[1] for k in optim if k != "step"} == set(straight.params()), "optimizer state beyond the adapters"
    adapters = straight.params()
    assert all(adapters[k].abs().max() > 0 for k in adapters if k.endswith("lora_B")), "B did not train"

    # Stop after 2 steps, start again with the same config: continues from the run folder's adapters.
    cfg, base = _config(tmp_path / "resumed", tiny_hf)
    run(cfg, base=base, samples=samples, stop_after=2)
    out = run(cfg, base=base, samples=samples)
    assert out["step"] == 4
    assert _losses(base / "run") == _losses(tmp_path / "straight" / "run")
    resumed = AdapterCheckpoint(base / "run").params()
    assert all(torch.equal(resumed[k], adapters[k]) for k in adapters)

    # Exports: the merged HF folder and the PEFT folder give adapter inference's logits.
    mcfg, params = omnicore.load_hf(tiny_hf)
    batch = samples[0] | {"input_ids": samples[0]["input_ids"][None], "labels": None}
    batch = {k: v for k, v in batch.items() if k != "labels"}
    ref = omnicore.thinker_logits(adapted(params, adapters, straight.spec), mcfg, batch, ops=omnicore.ops.CPU)
    merged = omnicore.load_hf(tmp_path / "merged")[1]
    got = omnicore.thinker_logits(merged, mcfg, batch, ops=omnicore.ops.CPU)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    spec, peft_params = read_peft_adapter(tmp_path / "peft", mcfg)
    assert spec.scale == straight.spec.scale and all(torch.equal(peft_params[k], adapters[k]) for k in adapters)


def test_adapters_of_another_base_are_refused(tiny_hf, samples, tmp_path):
    from quickstart import write_hf_folder

    cfg, base = _config(tmp_path / "first", tiny_hf, iters=2)
    run(cfg, base=base, samples=samples)
    other = tmp_path / "other_hf"
    write_hf_folder(other, omnicore.TINY, seed=1)
    cfg, base = _config(tmp_path / "second", other, iters=2, extra=[f"--lora.load={tmp_path / 'first' / 'run'}"])
    with pytest.raises(ConfigError, match="were trained on base .*but the base given is"):
        run(cfg, base=base, samples=samples)
    meta = json.loads((AdapterCheckpoint(tmp_path / "first" / "run").path / META).read_text())
    assert meta["lora"]["spec"]["r"] == 4


@pytest.mark.parametrize("setting, message", [("--lora.r=0", "positive integer rank, got 0"), ("--lora.targets=['qkv']", "unknown target module 'qkv'")])
def test_bad_lora_settings_stop_the_run(tiny_hf, samples, tmp_path, setting, message):
    cfg, base = _config(tmp_path, tiny_hf, iters=2, extra=[setting])
    with pytest.raises(ConfigError, match=message):
        run(cfg, base=base, samples=samples)


def test_chat_adapters_merge_and_refuse_another_base(tiny_hf, samples, tmp_path):
    import io

    from quickstart import write_hf_folder

    from omnicore import chat
    from omnicore.checkpoint.lora_io import adapter_merger
    from omnicore.lora import merge

    cfg, base = _config(tmp_path / "train", tiny_hf, iters=2, extra=[f"--lora.export_peft={tmp_path / 'peft'}"])
    run(cfg, base=base, samples=samples)
    ckpt = AdapterCheckpoint(base / "run")
    mcfg, params = omnicore.load_hf(tiny_hf)
    want = merge(params, ckpt.params(), ckpt.spec)
    for source in (base / "run", tmp_path / "peft"):  # an omnicore adapter checkpoint, a PEFT folder
        got = adapter_merger(source, tiny_hf)(params, mcfg)
        assert all(torch.equal(got[k], want[k]) for k in want)
    other = tmp_path / "other_hf"
    write_hf_folder(other, omnicore.TINY, seed=1)
    err = io.StringIO()
    rc = chat.main(["--ckpt", str(other), "--adapters", str(base / "run"), "hi"], stdin=io.StringIO(), stdout=io.StringIO(), stderr=err)
    assert rc == 2 and "were trained on base" in err.getvalue()


def test_bf16_base_trains_fp32_adapters(tiny_hf, samples, tmp_path):
    cfg, base = _config(tmp_path, tiny_hf, iters=2, extra=["--model.dtype=bf16"])
    run(cfg, base=base, samples=samples)
    ckpt = AdapterCheckpoint(base / "run")
    adapters = ckpt.params()
    assert all(v.dtype == torch.float32 for v in adapters.values())
    assert all(adapters[k].abs().max() > 0 for k in adapters if k.endswith("lora_B"))
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(base / "run").values())
