"""The recipe mapping table: complete against reference section 4, consistent with the run-config
schema, the data pipeline's rules and the published config.json, and equal to docs/migrate.md."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import attrs
import pytest

from omnicore.data.config import FIELDS
from omnicore_dist.config import RunConfig
from omnicore_dist.env import NPU_ENV
from omnicore_dist.recipe_map import KINDS, ROWS, hf_value, lookup, markdown_table

ROOT = Path(__file__).resolve().parents[2]
HF7B = json.loads((ROOT / "tests/fixtures/hf_configs/qwen2_5_omni_7b.json").read_text())

# Reference mindspeed_recipe.md section 4, copied from its wording. Each entry is (section, name).
ENV_41 = ["CUDA_DEVICE_MAX_CONNECTIONS=1", "ASCEND_SLOG_PRINT_TO_STDOUT=0", "ASCEND_GLOBAL_LOG_LEVEL=3", "TASK_QUEUE_ENABLE=2",
          "COMBINED_ENABLE=1", "CPU_AFFINITY_CONF=2", "HCCL_CONNECT_TIMEOUT=1200", "NPU_ASD_ENABLE=0",
          "ASCEND_LAUNCH_BLOCKING=0", "ACLNN_CACHE_LIMIT=100000"]  # fmt: skip
README_ENV_41 = ["PYTORCH_NPU_ALLOC_CONF", "HCCL_EXEC_TIMEOUT", "TOKENIZERS_PARALLELISM", "MULTI_STREAM_MEMORY_REUSE", "NPUS_PER_NODE"]
SHELL_41 = ["NPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "WORLD_SIZE", "MM_DATA", "MM_MODEL", "MM_TOOL",
            "LOAD_PATH", "SAVE_PATH", "TP", "PP", "CP", "MBS", "GRAD_ACC_STEP", "DP", "GBS"]  # fmt: skip
LAUNCH_41 = ["--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port"]
COMMANDS_41 = ["torchrun", "pretrain_vlm.py", "tee", "source", "chmod", "throughput report"]
FLAGS_41 = """
--use-mcore-models --tensor-model-parallel-size --pipeline-model-parallel-size --micro-batch-size --global-batch-size
--context-parallel-size --tokenizer-type --vocab-size --seq-length --make-vocab-size-divisible-by --normalization
--use-fused-rmsnorm --swiglu --use-fused-swiglu --no-masked-softmax-fusion --lr --lr-decay-style --weight-decay
--train-iters --lr-warmup-fraction --clip-grad --adam-beta1 --adam-beta2 --no-gradient-accumulation-fusion --seed --bf16
--variable-seq-lengths --use-distributed-optimizer --distributed-timeout-minutes --use-flash-attn --load --no-load-optim
--no-load-rng --no-save-optim --no-save-rng --num-workers --mm-data --mm-model --mm-tool --log-interval --save-interval
--eval-interval --eval-iters --save --ckpt-format --log-tps --distributed-backend
--hetero-parallel --hetero-encoder-mbs-scale --enable-dummy-optimizer --lora-target-modules --lora-r --lora-alpha
--lora-dropout --load-base-model --calculate-per-sample-loss --calculate-per-token-loss
--virtual-pipeline-model-parallel-size --encoder-dp-balance --use-data-balance --recompute-skip-core-attention
--trust-remote-code
""".split()
_V, _P, _A = "image_encoder.vision_encoder", "image_encoder.vision_projector", "audio_encoder.audio_encoder"
MODEL_42 = {
    "": "model_id img_context_token_id vision_start_token_id text_encoder video_encoder",
    _V: """model_id num_layers hidden_size ffn_hidden_size intermediate_size llm_hidden_size gated_linear_unit
           num_attention_heads hidden_dropout attention_dropout in_channels patch_size spatial_merge_size temporal_patch_size
           layernorm_epsilon normalization fp16 bf16 params_dtype activation_func freeze use_fused_rotary_pos_emb
           post_layer_norm pipeline_num_layers tokens_per_second window_attn_size fullatt_block_indexes attention_mask_type
           recompute_granularity recompute_method recompute_num_layers""",
    _P: """model_id num_layers gated_linear_unit bias_activation_fusion add_bias_linear input_size hidden_size ffn_hidden_size
           activation_func bf16 params_dtype freeze layernorm_epsilon normalization""",
    "image_encoder": "tp pp cp",
    _A: """model_id num_layers hidden_size ffn_hidden_size gated_linear_unit num_attention_heads hidden_dropout attention_dropout
           normalization fp16 bf16 params_dtype activation_func freeze use_fused_rotary_pos_emb post_layer_norm
           pipeline_num_layers d_model num_mel_bins max_source_positions n_window scale_embedding output_dim attention_mask_type""",
    "audio_encoder": "tp pp cp",
    "text_decoder": """model_id num_layers pipeline_num_layers hidden_size ffn_hidden_size num_attention_heads seq_length
           max_position_embeddings vocab_size rope_theta untie_embeddings_and_output_weights disable_bias_linear
           attention_dropout init_method_std hidden_dropout position_embedding_type mrope_section rope_scaling normalization
           activation_func use_fused_rotary_pos_emb attention_softmax_in_fp32 params_dtype bf16 parallel_output
           group_query_attention num_query_groups gated_linear_unit layernorm_epsilon add_bias_linear add_qkv_bias tp pp cp""",
}
DATA_43 = {
    "dataset_param": "dataset_type",
    "preprocess_parameters": """model_name_or_path use_fast_tokenizer split_special_tokens image_max_pixels image_min_pixels
        video_max_pixels video_min_pixels video_fps video_maxlen use_audio_in_video audio_sampling_rate trust_remote_code""",
    "basic_parameters": """template dataset_dir dataset cache_dir train_on_prompt mask_history preprocessing_batch_size
        preprocessing_num_workers max_samples tool_format streaming overwrite_cache val_dataset val_max_samples val_rate packing
        neat_packing preprocess_on_fly async_preprocess async_preprocess_buffer_size enable_thinking cutoff_len""",
    "attr": """system images videos audios messages role_tag content_tag user_tag assistant_tag observation_tag function_tag
        system_tag formatting ranking packing pretrain prompt query response history chosen rejected""",
    "dataloader_param": """dataloader_mode drop_last sampler_type collate_param.model_name collate_param.ignore_pad_token_for_loss
        pin_memory shuffle""",
}


def _reference() -> list[tuple[str, str]]:
    items = [("env", e.split("=")[0]) for e in ENV_41 + README_ENV_41]
    items += [("var", v) for v in SHELL_41] + [("launch", f) for f in LAUNCH_41] + [("command", c) for c in COMMANDS_41]
    items += [("flag", f) for f in FLAGS_41]
    items += [("model", f"{p}.{f}" if p else f) for p, fields in MODEL_42.items() for f in fields.split()]
    items += [("data", f"{p}.{f}") for p, fields in DATA_43.items() for f in fields.split()]
    return items


@pytest.mark.parametrize("section,name", _reference(), ids=lambda v: str(v))
def test_every_flag_and_field_of_reference_section_4_has_a_row(section, name):
    row = lookup(section, name)
    assert row is not None, f"the mapping table misses {section} {name}"
    assert row.why, f"{name}: every row says why"


def test_rows_are_unique_and_use_known_kinds():
    assert len({(r.section, r.name) for r in ROWS}) == len(ROWS)
    assert {r.kind for r in ROWS} <= set(KINDS)


def test_recipe_environment_values_are_the_launchers_defaults():
    for item in ENV_41[1:]:
        name, value = item.split("=")
        assert NPU_ENV[name][0] == value, name


def _schema_keys() -> set[str]:
    hints = typing.get_type_hints(RunConfig)
    return {f"{s}.{k}" for s in attrs.fields_dict(RunConfig) for k in attrs.fields_dict(hints[s])}


def test_mapped_keys_exist_in_the_schema():
    schema = _schema_keys()
    for row in ROWS:
        if row.kind == "key":  # model.recompute.<tower> names an entry of the model.recompute table
            for key in row.target.split(", "):
                assert key.removesuffix(".llm").removesuffix(".vision").removesuffix(".audio") in schema, (row.name, key)


def test_data_rows_follow_the_data_pipelines_rules():
    data_rows = {r.name: r for r in ROWS if r.section == "data"}
    for field, rule in FIELDS.items():
        covered = [r for name, r in data_rows.items() if name == field or name.startswith(field + ".")]
        assert covered, f"data.json field {field} has no row"
        if rule.kind == "checked":
            assert covered[0].kind == "checked" and covered[0].expect == (rule.allowed,)
        if rule.kind in ("ignored", "refused") and field != "dataloader_param.collate_param":
            assert covered[0].kind == rule.kind


@pytest.mark.parametrize("row", [r for r in ROWS if r.kind == "checked" and r.hf is not None], ids=lambda r: r.name)
def test_checked_rows_hold_the_recipe_values_of_the_published_config(row):
    value = int(row.recipe) if row.section == "flag" else row.recipe
    assert hf_value(row, HF7B) == pytest.approx(value) if isinstance(value, float) else hf_value(row, HF7B) == value


def test_docs_table_is_the_generated_one():
    docs = (ROOT / "docs/migrate.md").read_text()
    assert markdown_table() in docs, "regenerate the table: python -m omnicore_dist.recipe_map"
