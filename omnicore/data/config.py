"""`DataConfig`: the data pipeline's settings, and MindSpeed-MM's `data.json` accepted as it is.

`from_mindspeed` reads the recipe's file (`dataset_param` with `dataset_type`, `preprocess_parameters`,
`basic_parameters`, `attr`; `dataloader_param`). Each field is handled by one rule of `FIELDS`:
mapped onto a `DataConfig` attribute, accepted only with the one value omnicore supports ("checked"),
ignored with a warning (no effect here), or refused (`cutoff_len`: the sequence length comes from the
run config, as MindSpeed takes it from `--seq-length`). Unknown keys are errors naming the nearest
known key. docs/data_json.md is the table of these rules; a test checks it against this code.
Preprocess fields a file omits take LLaMA-Factory's defaults, which MindSpeed users get.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from omnicore.data.datasets import Conversations, DatasetSpec, load_conversations
from omnicore.data.formats import Attr
from omnicore.data.length import LengthPolicy
from omnicore.data.processor import ProcessorConfig
from omnicore.data.template import TemplateConfig

__all__ = [
    "DataConfig",
    "DataConfigError",
    "IgnoredFieldWarning",
    "Rule",
    "FIELDS",
    "LLAMA_FACTORY_PROCESSOR",
    "from_mindspeed",
    "load_data_config",
]

# LLaMA-Factory's ProcessorArguments defaults: what a data.json that omits these fields gets.
LLAMA_FACTORY_PROCESSOR = {
    "image_max_pixels": 768 * 768,
    "image_min_pixels": 32 * 32,
    "video_max_pixels": 256 * 256,
    "video_min_pixels": 16 * 16,
    "video_fps": 2.0,
    "video_maxlen": 128,
}


_BOOL = attrs.validators.instance_of(bool)


class DataConfigError(ValueError):
    """A data config omnicore refuses; the message names the field."""


class IgnoredFieldWarning(UserWarning):
    """data.json fields that have no effect in omnicore (listed by name)."""


@attrs.frozen(kw_only=True)
class DataConfig:
    """Settings of the data pipeline (datasets, columns, processor, template, length, loader knobs).

    `datasets` are read in order and concatenated; `max_samples` keeps the first N records of that
    concatenation. Media paths resolve against each dataset file's folder, then `dataset_dir`, then
    `media_roots`. `val_ratio` in [0, 1) moves that share of each dataset to validation.
    """

    datasets: tuple[DatasetSpec, ...] = attrs.field(converter=tuple)
    dataset_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    media_roots: tuple[Path, ...] = attrs.field(default=(), converter=lambda v: tuple(map(Path, v)))
    attr: Attr = Attr()
    max_samples: int | None = None
    val_ratio: float = 0.0
    val_datasets: tuple[DatasetSpec, ...] = attrs.field(default=(), converter=tuple)
    val_max_samples: int | None = None
    model_name_or_path: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    processor: ProcessorConfig = ProcessorConfig()
    template: TemplateConfig = TemplateConfig()
    length: LengthPolicy = LengthPolicy()
    cache_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    overwrite_cache: bool = attrs.field(default=False, validator=_BOOL)
    num_workers: int = 0
    packing: bool = attrs.field(default=False, validator=_BOOL)
    shuffle: bool = attrs.field(default=True, validator=_BOOL)
    drop_last: bool = attrs.field(default=False, validator=_BOOL)
    seed: int = 0
    on_bad_sample: str = "skip"

    def __attrs_post_init__(self) -> None:
        if not self.datasets:
            raise DataConfigError("DataConfig.datasets is empty: name at least one dataset file")
        if not (isinstance(self.val_ratio, (int, float)) and 0 <= self.val_ratio < 1):
            raise DataConfigError(f"DataConfig.val_ratio must be in [0, 1), got {self.val_ratio!r}")
        for name in ("max_samples", "val_max_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise DataConfigError(f"DataConfig.{name} must be a count >= 0 or null, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise DataConfigError(f"DataConfig.num_workers must be >= 0, got {self.num_workers!r}")
        if self.on_bad_sample not in ("skip", "error"):
            raise DataConfigError(f"DataConfig.on_bad_sample must be 'skip' or 'error', got {self.on_bad_sample!r}")

    def read_conversations(self, *, on_bad_sample: str | None = None) -> Conversations:
        """`datasets.load_conversations` with these settings (`on_bad_sample` overrides the config's)."""
        return load_conversations(
            self.datasets, attr=self.attr, max_samples=self.max_samples, val_ratio=self.val_ratio,
            val_datasets=self.val_datasets, val_max_samples=self.val_max_samples, seed=self.seed,
            on_bad_sample=on_bad_sample or self.on_bad_sample,
        )  # fmt: skip


@attrs.frozen
class Rule:
    """How one data.json field is handled: `kind` mapped / checked / ignored / refused.

    mapped: `target` is the dotted DataConfig attribute it sets; the JSON value must be an `expect`
    (a bool is never taken for a number) and `convert` turns it into the attribute. checked: only
    `allowed` is accepted, anything else is refused. `note` says why.
    """

    kind: str
    target: str = ""
    allowed: Any = None
    note: str = ""
    convert: Callable[[Any], Any] | None = None
    expect: type | tuple[type, ...] = object  # JSON type a mapped value must have


def _datasets(value: str) -> tuple[DatasetSpec, ...]:
    """MindSpeed's comma-separated list of dataset files (spaces around names stripped)."""
    return tuple(DatasetSpec(path=name.strip()) for name in value.split(",") if name.strip())


def _mapped(target: str, expect, convert: Callable[[Any], Any] | None = None, note: str = "") -> Rule:
    return Rule("mapped", target=target, convert=convert, note=note, expect=expect)


def _type_ok(value: Any, expect) -> bool:
    allowed = expect if isinstance(expect, tuple) else (expect,)
    return isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))


def _checked(allowed: Any, note: str) -> Rule:
    return Rule("checked", allowed=allowed, note=note)


_IGNORED = Rule("ignored", note="no effect in omnicore")
_ATTR_NAMES = ("system", "images", "videos", "audios", "messages", "role_tag", "content_tag", "user_tag")
_ATTR_NAMES += ("assistant_tag", "observation_tag", "function_tag", "system_tag")
_ALPACA = ("prompt", "query", "response", "history")

FIELDS: dict[str, Rule] = {
    "dataset_param.dataset_type": _checked("huggingface", "the LLaMA-Factory-style pipeline is the one omnicore has"),
    "preprocess_parameters.model_name_or_path": _mapped("model_name_or_path", str, Path),
    "preprocess_parameters.use_fast_tokenizer": _checked(True, "the `tokenizers` library is always used"),
    "preprocess_parameters.split_special_tokens": _checked(False, "special tokens are always single ids"),
    "preprocess_parameters.image_max_pixels": _mapped("processor.image_max_pixels", int),
    "preprocess_parameters.image_min_pixels": _mapped("processor.image_min_pixels", int),
    "preprocess_parameters.video_max_pixels": _mapped("processor.video_max_pixels", int),
    "preprocess_parameters.video_min_pixels": _mapped("processor.video_min_pixels", int),
    "preprocess_parameters.video_fps": _mapped("processor.video_fps", (int, float)),
    "preprocess_parameters.video_maxlen": _mapped("processor.video_maxlen", int),
    "preprocess_parameters.use_audio_in_video": _mapped("template.use_audio_in_video", bool),
    "preprocess_parameters.audio_sampling_rate": _checked(16000, "Whisper features are defined at 16 kHz"),
    "preprocess_parameters.trust_remote_code": _IGNORED,
    "basic_parameters.template": _checked("qwen2_omni", "the Qwen2.5-Omni template is built in"),
    "basic_parameters.dataset_dir": _mapped("dataset_dir", str, Path),
    "basic_parameters.dataset": _mapped("datasets", str, _datasets),
    "basic_parameters.cache_dir": _mapped("cache_dir", str, Path),
    "basic_parameters.train_on_prompt": _mapped("template.train_on_prompt", bool),
    "basic_parameters.mask_history": _mapped("template.mask_history", bool),
    "basic_parameters.preprocessing_batch_size": _IGNORED,
    "basic_parameters.preprocessing_num_workers": _mapped("num_workers", int),
    "basic_parameters.max_samples": _mapped("max_samples", int),
    "basic_parameters.tool_format": _checked(None, "tool calls are not supported"),
    "basic_parameters.streaming": _checked(False, "datasets are read whole, then cached"),
    "basic_parameters.overwrite_cache": _mapped("overwrite_cache", bool),
    "basic_parameters.val_dataset": _mapped("val_datasets", str, _datasets),
    "basic_parameters.val_max_samples": _mapped("val_max_samples", int),
    "basic_parameters.val_rate": _mapped("val_ratio", (int, float)),
    "basic_parameters.packing": _mapped("packing", bool),
    "basic_parameters.neat_packing": _mapped("packing", bool, note="packing never attends across samples"),
    "basic_parameters.preprocess_on_fly": _IGNORED,
    "basic_parameters.async_preprocess": _IGNORED,
    "basic_parameters.async_preprocess_buffer_size": _IGNORED,
    "basic_parameters.enable_thinking": _IGNORED,
    "basic_parameters.cutoff_len": Rule("refused", note="the sequence length comes from the run config"),
    **{f"attr.{name}": _mapped(f"attr.{name}", str) for name in _ATTR_NAMES},
    "attr.formatting": _checked("sharegpt", "the alpaca layout is not supported"),
    "attr.ranking": _checked(False, "preference data is not supported"),
    "attr.packing": _IGNORED,
    "attr.pretrain": _checked(False, "pre-training text layouts are not supported"),
    **{f"attr.{name}": _checked(None, "alpaca columns are not supported") for name in _ALPACA},
    **{f"attr.{name}": _checked(None, "preference data is not supported") for name in ("chosen", "rejected")},
    "dataloader_param.dataloader_mode": _IGNORED,
    "dataloader_param.drop_last": _mapped("drop_last", bool),
    "dataloader_param.sampler_type": _IGNORED,
    "dataloader_param.collate_param": _IGNORED,
    "dataloader_param.pin_memory": _IGNORED,
    "dataloader_param.shuffle": _mapped("shuffle", bool),
}  # fmt: skip

_SECTIONS = ("preprocess_parameters", "basic_parameters", "attr")


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """{"section.key": value} for the fields of a data.json (unknown top-level keys refused)."""
    if not isinstance(data, Mapping):
        raise DataConfigError("data.json must be a JSON object with dataset_param and dataloader_param")
    flat = {}
    for top, body in data.items():
        if top not in ("dataset_param", "dataloader_param"):
            hint = _nearest(top, ["dataset_param", "dataloader_param"])
            raise DataConfigError(f"unknown top-level key {top!r}{hint}")
        if not isinstance(body, Mapping):
            raise DataConfigError(f"{top} must be an object")
        for key, value in body.items():
            if top == "dataset_param" and key in _SECTIONS:
                if not isinstance(value, Mapping):
                    raise DataConfigError(f"dataset_param.{key} must be an object")
                flat |= {f"{key}.{k}": v for k, v in value.items()}
            else:
                flat[f"{top}.{key}"] = value
    # MindSpeed's dataset factory requires these three; refusing here beats a confusing default later.
    missing = [f"dataset_param.{k}" for k in ("dataset_type", "basic_parameters", "preprocess_parameters")]
    missing = [m for m in missing if m.split(".")[1] not in data.get("dataset_param", {})]
    if missing:
        raise DataConfigError(f"data.json lacks {', '.join(missing)} (MindSpeed-MM requires them)")
    return flat


def _nearest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """{"processor.video_fps": 2} -> {"processor": {"video_fps": 2}}."""
    out: dict[str, Any] = {}
    for target, value in values.items():
        head, _, tail = target.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = value
        else:
            out[head] = value
    return out


def from_mindspeed(data: Mapping[str, Any], **overrides) -> DataConfig:
    """A `DataConfig` from a parsed MindSpeed-MM data.json; `overrides` set DataConfig fields on top
    (e.g. `length=LengthPolicy(max_seq_len=...)` from the run config)."""
    # LLaMA-Factory's processor defaults first: a field the file omits behaves as it does in MindSpeed.
    values: dict[str, Any] = {f"processor.{k}": v for k, v in LLAMA_FACTORY_PROCESSOR.items()}
    ignored = []
    for field, value in _flatten(data).items():
        rule = FIELDS.get(field)
        if rule is None:
            raise DataConfigError(f"unknown data.json field {field!r}{_nearest(field, FIELDS)}")
        if rule.kind == "ignored":
            ignored.append(field)
        elif rule.kind == "refused":
            raise DataConfigError(f"data.json field {field!r} is refused: {rule.note}")
        # In `attr` a null means "not set" (the recipe writes `observation_tag: null`), never a value.
        elif rule.kind == "checked" and value != rule.allowed and not (value is None and field.startswith("attr.")):
            raise DataConfigError(
                f"data.json field {field!r} = {value!r} is not supported ({rule.note}); use {rule.allowed!r}"
            )
        elif rule.kind == "mapped" and value is not None:
            if not _type_ok(value, rule.expect):
                raise DataConfigError(f"data.json field {field!r} = {value!r} has the wrong type")
            try:
                value = rule.convert(value) if rule.convert else value
            except (TypeError, ValueError) as e:
                raise DataConfigError(f"data.json field {field!r}: {e}") from None
            if rule.target == "packing":  # packing and neat_packing: either one switches it on
                value = bool(values.get("packing")) or value
            values[rule.target] = value
    if ignored:
        message = f"data.json fields with no effect in omnicore, ignored: {', '.join(ignored)}"
        warnings.warn(message, IgnoredFieldWarning, stacklevel=2)
    nested = _nest(values)
    # The nested configs validate their own fields; their errors name the attribute.
    try:
        nested["processor"] = ProcessorConfig(**nested["processor"])
        nested["template"] = TemplateConfig(**nested.get("template", {}))
        nested["attr"] = Attr(**nested.get("attr", {}))
        return DataConfig(**(nested | overrides))
    except (TypeError, ValueError) as e:
        raise DataConfigError(f"data.json: {e}") from None


def load_data_config(path: str | os.PathLike, **overrides) -> DataConfig:
    """Read a MindSpeed-MM data.json file (relative paths inside stay relative to the working folder,
    as in MindSpeed)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise DataConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    try:
        return from_mindspeed(data, **overrides)
    except DataConfigError as e:
        raise DataConfigError(f"{path}: {e}") from None
