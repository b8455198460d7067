"""Configs from the published 7B / 3B config.json, param_shapes against HF on the meta device, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omnicore.checkpoint.hf import hf_to_native
from omnicore.config import TINY, ConfigError, ThinkerConfig, load_config
from omnicore.models.thinker import param_shapes
from omnicore.params import param_count

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
PUBLISHED = {
    "7b": (FIXTURES / "qwen2_5_omni_7b.json", 1346, 8_931_813_888),
    "3b": (FIXTURES / "qwen2_5_omni_3b.json", 1442, 4_703_464_448),
}


@pytest.mark.parametrize("size", PUBLISHED)
def test_published_config_param_shapes_match_hf_on_meta(size):
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniThinkerForConditionalGeneration

    path, n_tensors, n_params = PUBLISHED[size]
    cfg = load_config(path)
    shapes = param_shapes(cfg)
    assert len(shapes) == n_tensors
    assert param_count(shapes) == n_params

    hf_cfg = Qwen2_5OmniConfig.from_dict(json.loads(path.read_text())).thinker_config
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration(hf_cfg)
    hf_shapes = {hf_to_native(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert None not in hf_shapes, "every HF thinker key has a native name"
    assert hf_shapes == shapes


def test_published_7b_fields():
    cfg = load_config(PUBLISHED["7b"][0])
    assert (cfg.text.hidden, cfg.text.n_layers, cfg.text.n_heads, cfg.text.n_kv_heads) == (3584, 28, 28, 4)
    assert cfg.text.mrope_section == (16, 24, 24) and cfg.text.head_dim == 128
    assert cfg.vision.window_units == 4 and cfg.vision.fullatt_blocks == (7, 15, 23, 31)
    assert cfg.audio.chunk_frames == 200 and cfg.audio.head_dim == 64
    assert (cfg.tokens.audio, cfg.tokens.image, cfg.tokens.video, cfg.tokens.vision_start) == (151646, 151655, 151656, 151652)
    assert cfg.position_id_per_seconds == 25 and cfg.seconds_per_chunk == 2


def test_thinker_only_and_full_configs_agree():
    full = json.loads(PUBLISHED["7b"][0].read_text())
    assert ThinkerConfig.from_hf(full) == ThinkerConfig.from_hf(full["thinker_config"])


def test_to_hf_round_trip_and_5x_rope_spelling():
    assert ThinkerConfig.from_hf(TINY.to_hf()) == TINY
    hf = TINY.to_hf()
    text = hf["text_config"]
    text["rope_parameters"] = {"mrope_section": text.pop("rope_scaling")["mrope_section"], "rope_theta": text.pop("rope_theta")}
    hf["image_token_id"] = hf.pop("image_token_index")
    assert ThinkerConfig.from_hf(hf) == TINY


def _broken(edit):
    hf = TINY.to_hf()
    edit(hf)
    return hf


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda h: h["text_config"].update(num_attention_heads=5), "not divisible by num_attention_heads 5"),
        (lambda h: h["text_config"].update(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
        (lambda h: h["vision_config"].update(num_heads=3), "hidden_size 32 is not divisible by num_heads 3"),
        (lambda h: h["audio_config"].update(encoder_attention_heads=5), "d_model 32 is not divisible"),
        (lambda h: h["text_config"]["rope_scaling"].update(mrope_section=[2, 3, 2]), "mrope_section"),
        (lambda h: h.pop("vision_start_token_id"), "no vision_start_token_id"),
        (lambda h: h["vision_config"].pop("hidden_size"), "vision_config.hidden_size"),
        (lambda h: h.update(image_token_index=9999), "outside the vocabulary"),
        (lambda h: h["text_config"].update(hidden_act="gelu"), "hidden_act = 'gelu' is not supported"),
        (lambda h: h["vision_config"].update(out_hidden_size=8), "out_hidden_size 8"),
    ],
)
def test_bad_configs_name_the_key(edit, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ThinkerConfig.from_hf(_broken(edit))


def test_load_config_reports_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_omni",\n "thinker_config": }')
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 2"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nowhere")
