"""LoRA exports checked with transformers and peft: the merged full HF checkpoint (talker kept,
original dtypes) and the PEFT adapter folder give the logits of omnicore's adapter inference
(max |diff| <= 1e-5 x max |logit|, fp32)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hf_reference import Piece, build_batch, full_omni_folder, hf_kwargs

import omnicore
from omnicore.checkpoint.hf import SafetensorsFolder
from omnicore.checkpoint.lora_io import export_merged_hf, read_peft_adapter, write_peft_adapter
from omnicore.config import TINY
from omnicore.lora import LoraSpec, adapted, init_adapters

EVERY_TOWER = ("llm", "vision", "audio")
MIXED = [[Piece("text", 3), Piece("image", grid=(1, 4, 6)), Piece("text", 2), Piece("audio", 57), Piece("text", 4)], [Piece("text", 6)]]


def _adapters(spec, seed=1, std=0.05):
    gen = torch.Generator().manual_seed(seed + 100)
    a = init_adapters(TINY, spec, seed=seed)
    return {k: torch.randn(v.shape, generator=gen) * std if k.endswith("lora_B") else v for k, v in a.items()}


def _close(x, ref, valid):
    x, ref = x[valid], ref[valid]
    err, top = (x - ref).abs().max(), ref.abs().max()
    assert err <= 1e-5 * top, f"logits differ by {err:.3g} (max |logit| {top:.3g})"


@pytest.fixture(scope="module")
def omni_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("omni")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full_omni_folder(TINY, folder)
    return folder


def test_merged_export_matches_adapter_inference_in_omnicore_and_transformers(omni_folder, tmp_path):
    from transformers import Qwen2_5OmniForConditionalGeneration

    spec = LoraSpec(targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], r=4, alpha=8, towers=EVERY_TOWER)
    adapters = _adapters(spec)
    cfg, base = omnicore.load_hf(omni_folder)
    batch = build_batch(cfg, MIXED, seed=3)
    valid = batch["attention_mask"].bool()
    ref = omnicore.thinker_logits(adapted(base, adapters, spec), cfg, batch, ops=omnicore.ops.CPU)

    out = export_merged_hf(omni_folder, omni_folder, adapters, spec, tmp_path / "merged")
    _, merged = omnicore.load_hf(out)
    _close(omnicore.thinker_logits(merged, cfg, batch, ops=omnicore.ops.CPU), ref, valid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Qwen2_5OmniForConditionalGeneration.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model.thinker(**hf_kwargs(batch)).logits
    _close(hf_logits, ref, valid)

    # Talker and token2wav copied unchanged, shard layout and dtypes those of the original.
    src, dst = SafetensorsFolder(omni_folder), SafetensorsFolder(out)
    assert src.keys() == dst.keys()
    for k in src.keys():
        assert src.file(k).tensors[k].dtype == dst.file(k).tensors[k].dtype
        if not k.startswith("thinker."):
            assert torch.equal(src.get(k), dst.get(k)), k
    assert (out / "spk_dict.pt").read_bytes() == (omni_folder / "spk_dict.pt").read_bytes()


def test_peft_folder_loads_with_peft_and_gives_the_same_logits(hf_pair, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    cfg, _, base, folder = hf_pair("tiny_gqa")
    spec = LoraSpec(targets=["q_proj", "v_proj", "down_proj", "fc1"], r=4, alpha=16, rslora=True, towers=EVERY_TOWER)
    adapters = _adapters(spec, seed=2)
    batch = build_batch(cfg, MIXED, seed=5)
    valid = batch["attention_mask"].bool()
    ref = omnicore.thinker_logits(adapted(base, adapters, spec), cfg, batch, ops=omnicore.ops.CPU)

    peft_dir = write_peft_adapter(tmp_path / "peft", adapters, spec, base_model=str(folder))
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32).eval()
        peft = PeftModel.from_pretrained(model, peft_dir).eval()
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.named_parameters() if ".lora_A." in n}
    assert len(lora_modules) == len(adapters) // 2, "peft attached adapters to other modules"
    with torch.no_grad():
        _close(peft(**hf_kwargs(batch)).logits, ref, valid)

    spec_back, params_back = read_peft_adapter(peft_dir, cfg)
    assert spec_back.scale == spec.scale and set(params_back) == set(adapters)
    assert all(torch.equal(params_back[k], adapters[k]) for k in adapters)
