"""MindSpeed-MM data.json -> DataConfig: the recipe's files as fixtures, every row of docs/data_json.md
checked against the code, and image + video data in one run with the recipe's attr unchanged."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
from data_files import write_image, write_json, write_video

from omnicore import TINY
from omnicore.data import (
    DataConfigError,
    DataStats,
    DatasetSpec,
    IgnoredFieldWarning,
    LengthPolicy,
    SampleContext,
    from_mindspeed,
    iter_samples,
    load_data_config,
)
from omnicore.data.config import FIELDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "data_json.md"

# examples/qwen2.5omni/data_7b.json as mindspeed_recipe.md section 4.3 lists it.
RECIPE = {
    "dataset_param": {
        "dataset_type": "huggingface",
        "preprocess_parameters": {
            "model_name_or_path": "./ckpt/hf_path/Qwen2.5-Omni-7B", "use_fast_tokenizer": True,
            "split_special_tokens": False, "image_max_pixels": 262144, "image_min_pixels": 0,
            "video_max_pixels": 16384, "video_min_pixels": 0, "video_fps": 2.0, "video_maxlen": 128,
        },
        "basic_parameters": {
            "template": "qwen2_omni", "dataset_dir": "./data", "dataset": "./data/mllm_format_llava_instruct_data.json",
            "cache_dir": "./data/cache_dir", "train_on_prompt": False, "mask_history": False,
            "preprocessing_batch_size": 1000, "preprocessing_num_workers": 16, "max_samples": None, "tool_format": None,
        },
        "attr": {
            "system": None, "images": None, "videos": "videos", "audios": "audios", "messages": "messages",
            "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "observation_tag": None, "function_tag": None, "system_tag": None,
        },
    },
    "dataloader_param": {
        "dataloader_mode": "sampler", "drop_last": True, "sampler_type": "BaseRandomBatchSampler",
        "collate_param": {"model_name": "qwen2vl", "ignore_pad_token_for_loss": True}, "pin_memory": True, "shuffle": True,
    },
}  # fmt: skip

# Every field of mindspeed_recipe.md 4.3 and data_formats.md 3 (the docs table must cover them all).
REFERENCE_FIELDS = (
    ["dataset_param.dataset_type"]
    + [f"preprocess_parameters.{k}" for k in (
        "model_name_or_path use_fast_tokenizer split_special_tokens image_max_pixels image_min_pixels video_max_pixels "
        "video_min_pixels video_fps video_maxlen use_audio_in_video audio_sampling_rate trust_remote_code").split()]
    + [f"basic_parameters.{k}" for k in (
        "template dataset_dir dataset cache_dir train_on_prompt mask_history preprocessing_batch_size "
        "preprocessing_num_workers max_samples tool_format streaming overwrite_cache val_dataset val_max_samples val_rate "
        "packing neat_packing preprocess_on_fly async_preprocess async_preprocess_buffer_size enable_thinking "
        "cutoff_len").split()]
    + [f"attr.{k}" for k in (
        "system images videos audios messages role_tag content_tag user_tag assistant_tag observation_tag function_tag "
        "system_tag formatting ranking packing pretrain prompt query response history chosen rejected").split()]
    + [f"dataloader_param.{k}" for k in "dataloader_mode drop_last sampler_type collate_param pin_memory shuffle".split()]
)  # fmt: skip

# A value to set for each mapped field, and what the DataConfig attribute must then hold.
MAPPED_VALUES = {
    "preprocess_parameters.model_name_or_path": ("./ckpt/x", Path("./ckpt/x")),
    "preprocess_parameters.image_max_pixels": (123456, 123456),
    "preprocess_parameters.image_min_pixels": (12, 12),
    "preprocess_parameters.video_max_pixels": (20000, 20000),
    "preprocess_parameters.video_min_pixels": (17, 17),
    "preprocess_parameters.video_fps": (1.0, 1.0),
    "preprocess_parameters.video_maxlen": (64, 64),
    "preprocess_parameters.use_audio_in_video": (True, True),
    "basic_parameters.dataset_dir": ("./d", Path("./d")),
    "basic_parameters.dataset": (" a.json , ./b/c.jsonl", (DatasetSpec(path="a.json"), DatasetSpec(path="./b/c.jsonl"))),
    "basic_parameters.cache_dir": ("./cache/node0", Path("./cache/node0")),
    "basic_parameters.train_on_prompt": (True, True),
    "basic_parameters.mask_history": (True, True),
    "basic_parameters.preprocessing_num_workers": (3, 3),
    "basic_parameters.max_samples": (200, 200),
    "basic_parameters.overwrite_cache": (True, True),
    "basic_parameters.val_dataset": ("v.json", (DatasetSpec(path="v.json"),)),
    "basic_parameters.val_max_samples": (5, 5),
    "basic_parameters.val_rate": (0.1, 0.1),
    "basic_parameters.packing": (True, True),
    "basic_parameters.neat_packing": (True, True),
    "dataloader_param.drop_last": (True, True),
    "dataloader_param.shuffle": (False, False),
}


def _table() -> dict[str, tuple[str, str]]:
    rows = re.findall(r"^\| `([\w.]+)` \| (\w+) \| (.*) \|$", DOC.read_text(), flags=re.M)
    assert len(rows) == len({field for field, _, _ in rows}), "a field appears twice in the table"
    return {field: (kind, text) for field, kind, text in rows}


def _minimal() -> dict:
    return {
        "dataset_param": {
            "dataset_type": "huggingface",
            "preprocess_parameters": {},
            "basic_parameters": {"dataset": "a.json"},
        }
    }


def _with(field: str, value) -> dict:
    data = _minimal()
    section, key = field.split(".")
    if section in ("dataset_param", "dataloader_param"):
        data.setdefault(section, {})[key] = value
    else:
        data["dataset_param"].setdefault(section, {})[key] = value
    return data


def _get(cfg, target: str):
    for part in target.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_table_covers_the_reference_and_the_code():
    table = _table()
    assert set(REFERENCE_FIELDS) <= set(table), sorted(set(REFERENCE_FIELDS) - set(table))
    assert set(table) == set(FIELDS)


@pytest.mark.parametrize("field", sorted(_table()))
def test_docs_table_matches_the_code(field):
    kind, text = _table()[field]
    first = re.search(r"`([^`]+)`", text)
    if kind == "mapped":
        value, expected = MAPPED_VALUES.get(field, ("custom_name", "custom_name"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a mapped field never warns
            cfg = from_mindspeed(_with(field, value))
        assert _get(cfg, first.group(1)) == expected
    elif kind == "checked":
        allowed = json.loads(first.group(1))
        from_mindspeed(_with(field, allowed))
        other = {True: False, False: True, None: "x"}.get(allowed, 12345 if isinstance(allowed, int) else "other")
        with pytest.raises(DataConfigError, match=re.escape(field)):
            from_mindspeed(_with(field, other))
    elif kind == "ignored":
        with pytest.warns(IgnoredFieldWarning, match=re.escape(field)):
            from_mindspeed(_with(field, 7))
    else:
        assert kind == "refused", f"unknown handling {kind!r}"
        with pytest.raises(DataConfigError, match=re.escape(field)):
            from_mindspeed(_with(field, 3072))


def test_the_recipe_file_as_is(tmp_path):
    path = write_json(tmp_path / "data_7b.json", RECIPE)
    with pytest.warns(IgnoredFieldWarning) as caught:
        cfg = load_data_config(path)
    message = str(caught[0].message)
    for field in ("preprocessing_batch_size", "dataloader_mode", "sampler_type", "collate_param", "pin_memory"):
        assert field in message
    assert cfg.datasets == (DatasetSpec(path="./data/mllm_format_llava_instruct_data.json"),)
    assert cfg.processor.video_max_pixels == 16384 and cfg.processor.image_min_pixels == 0
    assert cfg.processor.video_maxlen == 128 and cfg.model_name_or_path == Path("./ckpt/hf_path/Qwen2.5-Omni-7B")
    assert cfg.attr.videos == "videos" and cfg.attr.images is None and cfg.attr.system_tag == "system"
    assert cfg.num_workers == 16 and cfg.drop_last and cfg.shuffle and cfg.max_samples is None
    # Omitted preprocess fields take LLaMA-Factory's defaults.
    assert from_mindspeed(_minimal()).processor.image_max_pixels == 768 * 768


def test_refusals_name_the_field(tmp_path):
    data = copy.deepcopy(RECIPE)
    data["dataset_param"]["basic_parameters"]["cutoff_len"] = 1024
    with pytest.raises(DataConfigError, match="cutoff_len.*run config"):
        from_mindspeed(data)
    typo = _with("basic_parameters.max_sample", 10)
    with pytest.raises(DataConfigError, match="did you mean 'basic_parameters.max_samples'"):
        from_mindspeed(typo)
    with pytest.raises(DataConfigError, match="lacks dataset_param.preprocess_parameters"):
        from_mindspeed({"dataset_param": {"dataset_type": "huggingface", "basic_parameters": {"dataset": "a"}}})
    with pytest.raises(DataConfigError, match="template 'llava' is not supported|basic_parameters.template"):
        from_mindspeed(_with("basic_parameters.template", "llava"))
    with pytest.raises(DataConfigError, match="val_ratio"):
        from_mindspeed(_with("basic_parameters.val_rate", 1.5))
    for field, value in (("basic_parameters.train_on_prompt", "false"), ("preprocess_parameters.image_max_pixels", "big"),
                         ("preprocess_parameters.video_fps", True), ("attr.messages", 3)):  # fmt: skip
        with pytest.raises(DataConfigError, match=f"{re.escape(field)}.*wrong type"):
            from_mindspeed(_with(field, value))
    (tmp_path / "bad.json").write_text('{"dataset_param": ')
    with pytest.raises(DataConfigError, match="bad.json: invalid JSON at line 1"):
        load_data_config(tmp_path / "bad.json")


def test_image_and_video_data_in_one_run_without_config_edit(tmp_path, model_dir, tokenizer):
    """The README's video setup (attr: images null, videos / audios) with a LLaVA image file added to
    `dataset`: both files are read and processed with no other change."""
    data_dir = tmp_path / "data"
    write_image(data_dir / "COCO2017" / "train2017" / "000000000001.jpg", 56, 56)
    write_video(data_dir / "mllm_demo_data" / "4.mp4", frames=8, fps=4, audio_seconds=2.0)
    write_json(data_dir / "mllm_format_llava_instruct_data.json", [
        {"images": ["COCO2017/train2017/000000000001.jpg"],
         "messages": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "Noise."}]},
        {"id": "raw", "image": "COCO2017/train2017/000000000001.jpg",
         "conversations": [{"from": "human", "value": "<image>\nAgain?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ])  # fmt: skip
    write_json(data_dir / "mllm_video_audio_demo.json", [
        {"messages": [{"role": "user", "content": "<video><audio>What is said?"}, {"role": "assistant", "content": "Hi."}],
         "videos": ["mllm_demo_data/4.mp4"], "audios": ["mllm_demo_data/4.mp4"]},
    ])  # fmt: skip
    data = copy.deepcopy(RECIPE)
    data["dataset_param"]["preprocess_parameters"] |= {"model_name_or_path": str(model_dir), "use_audio_in_video": True}
    data["dataset_param"]["basic_parameters"] |= {
        "dataset_dir": str(data_dir),
        "dataset": f"{data_dir}/mllm_format_llava_instruct_data.json, {data_dir}/mllm_video_audio_demo.json",
    }
    with pytest.warns(IgnoredFieldWarning):
        cfg = load_data_config(write_json(tmp_path / "data.json", data), length=LengthPolicy(max_seq_len=4096))
    convs = cfg.read_conversations()
    assert len(convs.train) == 4 and convs.stats.dropped == 0
    ctx = SampleContext.for_data(cfg, tokenizer, TINY)
    assert ctx.processor.video_max_pixels == 16384 and ctx.template.use_audio_in_video and ctx.length.max_seq_len == 4096
    stats = DataStats()
    samples = list(iter_samples(convs.train, ctx, stats))
    assert [sorted(k for k in s.media if k.endswith("grid_thw")) for s in samples] == [
        ["image_grid_thw"], ["image_grid_thw"], [], ["video_grid_thw"]
    ]
    assert samples[3].use_audio_in_video and "input_features" in samples[3].media
    assert stats.counts["samples"] == 4
