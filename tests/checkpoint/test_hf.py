"""The HF name table and HF folder loading: bit-exact renaming, every key used once, clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import omnicore
from omnicore.checkpoint.hf import (
    HF_NAME_TABLE,
    CheckpointError,
    hf_to_native,
    native_to_hf,
    params_from_hf,
    params_to_hf,
)
from omnicore.config import TINY
from omnicore.models.thinker import init_thinker, param_shapes


def test_from_hf_of_to_hf_is_identity_and_bit_exact():
    params = init_thinker(TINY, seed=3)
    hf = params_to_hf(params)
    assert all(k.startswith("thinker.") for k in hf)
    back = params_from_hf(hf, TINY)
    assert back.keys() == params.keys()
    assert all(back[k] is params[k] for k in params)  # renaming only: the very same tensors


def test_every_table_rule_is_used_and_names_are_one_to_one():
    natives = list(param_shapes(TINY))
    hf_names = [native_to_hf(n) for n in natives]
    assert len(set(hf_names)) == len(natives)
    assert [hf_to_native(h) for h in hf_names] == natives
    for hf, _ in HF_NAME_TABLE:  # no dead rule
        pattern = re.compile(re.escape(hf).replace(r"\{i\}", r"\d+") + "(weight|bias)$")
        assert any(pattern.match(h) for h in hf_names), f"rule {hf} matches no tensor"


def _write_full_folder(folder, params, *, shards=2, extra=None, drop=None):
    """A full Omni layout: composite config, thinker.-prefixed keys, talker keys, sharded with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    full_cfg = {"model_type": "qwen2_5_omni", "thinker_config": TINY.to_hf(), "talker_config": {}, "token2wav_config": {}}
    (folder / "config.json").write_text(json.dumps(full_cfg))
    state = params_to_hf(params) | {"talker.codec_head.weight": torch.ones(3, 2)} | (extra or {})
    for k in drop or ():
        state.pop(k)
    names = sorted(state)
    weight_map = {}
    for s in range(shards):
        part = {k: state[k].contiguous() for k in names[s::shards]}
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / file))
        weight_map |= {k: file for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_load_full_omni_folder_ignores_talker_and_keeps_bits(tmp_path):
    params = init_thinker(TINY, seed=1)
    cfg, loaded = omnicore.load_hf(_write_full_folder(tmp_path / "full", params))
    assert cfg == TINY
    assert loaded.keys() == params.keys()
    assert all(torch.equal(loaded[k], params[k]) for k in params)


def test_load_thinker_only_folder_from_transformers(hf_pair):
    cfg, model, params, folder = hf_pair("tiny_gqa")
    state = model.state_dict()
    assert all(torch.equal(params[hf_to_native(k)], v) for k, v in state.items())
    assert len(params) == len(state)


def test_load_casts_dtype(tmp_path):
    _, loaded = omnicore.load_hf(_write_full_folder(tmp_path / "f", init_thinker(TINY, seed=1)), dtype=torch.bfloat16)
    assert {v.dtype for v in loaded.values()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(drop=["thinker.model.layers.1.mlp.up_proj.weight"]), r"missing 1 tensor\(s\): text.layers.1.mlp.up.weight"),
        (dict(extra={"thinker.model.layers.0.mlp.extra.weight": torch.zeros(2)}), "does not know: thinker.model.layers.0.mlp.extra.weight"),
        (dict(extra={"thinker.model.layers.9.mlp.up_proj.weight": torch.zeros(2)}), r"unexpected 1 tensor\(s\): text.layers.9.mlp.up.weight"),
    ],
)
def test_bad_tensor_sets_are_named(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        omnicore.load_hf(_write_full_folder(tmp_path / "bad", init_thinker(TINY, seed=1), **change))


def test_wrong_shape_is_named(tmp_path):
    params = init_thinker(TINY, seed=1)
    params["text.layers.0.attn.k.weight"] = torch.zeros(3, 64)
    with pytest.raises(CheckpointError, match=r"text.layers.0.attn.k.weight: expected \(32, 64\), found \(3, 64\)"):
        omnicore.load_hf(_write_full_folder(tmp_path / "bad", params))


def test_missing_and_truncated_shards_are_named(tmp_path):
    folder = _write_full_folder(tmp_path / "m", init_thinker(TINY, seed=1))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: shard listed in the index is missing"):
        omnicore.load_hf(folder)
    folder = _write_full_folder(tmp_path / "t", init_thinker(TINY, seed=1))
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        omnicore.load_hf(folder)


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle files are never loaded"):
        omnicore.load_hf(tmp_path)
    assert not marker.exists()
