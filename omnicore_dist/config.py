"""The run-config schema: one TOML file, strict, with `--section.key=value` overrides.

Sections (DESIGN.md section 8): `model`, `data`, `parallel`, `train`, `checkpoint`, `eval`, `lora`, `log`, `ops`;
each capability adds its keys to its section here. Model *structure* never appears: it comes from
the checkpoint's config.json. Loading is strict: an unknown or misspelt key is an error that names
the nearest valid key; a value of the wrong type is an error naming the key and the expected type.
The resolved config is written to the run folder as TOML, so a run can be repeated exactly.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

__all__ = ["RunConfig", "ConfigError", "load_run_config", "parse_overrides", "to_toml", "FREEZABLE"]

FREEZABLE = ("vision", "vision_merger", "audio", "audio_proj", "llm")


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key (and its nearest valid name)."""


@attrs.frozen(kw_only=True)
class ModelSection:
    load: str  # HF folder, native release or training checkpoint root
    iteration: int | None = None  # which training iteration to load (default: the tracker's)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # parameters / compute; auto = bf16 on accelerators, fp32 on CPU
    freeze: tuple[str, ...] = ()  # any of FREEZABLE
    recompute: Mapping[str, str | int] = attrs.field(factory=dict)  # tower -> "full" | "uniform" | layer count


@attrs.frozen(kw_only=True)
class DataSection:
    config: str = ""  # a data config (MindSpeed data.json or omnicore's), resolved against the run file
    seq_length: int = 3072
    micro_batch_size: int = 1
    global_batch_size: int = 1
    # Token budget per micro-batch (0: micro_batch_size samples each). A rank's global_batch / dp
    # samples are cut, in order, into micro-batches of at most this many tokens (packed; a longer
    # sample alone); micro_batch_size then only has to divide global_batch / dp.
    micro_batch_tokens: int = 0
    num_workers: int = 0
    seed: int = 42
    shuffle: bool = True


@attrs.frozen(kw_only=True)
class ParallelSection:
    tp: int = 1
    vit_tp: int | None = None
    audio_tp: int | None = None
    llm_pp_layers: tuple[int, ...] | None = None
    vit_pp_layers: tuple[int, ...] | None = None
    audio_pp_layers: tuple[int, ...] | None = None
    pipeline_schedule: Literal["1f1b", "gpipe"] = "1f1b"  # with several stages (llm_pp_layers)
    sequence_parallel: bool = False  # split the decoder layers' norm regions along tokens (needs tp > 1)
    cp: int = 1  # context-parallel size: only 1 (context parallelism is not built)
    distributed_optimizer: bool = False  # ZeRO-1 over the data-parallel group
    timeout_minutes: float = 30.0  # collectives that take longer fail, naming the operation


@attrs.frozen(kw_only=True)
class TrainSection:
    train_iters: int
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_warmup_iters: int | None = None
    lr_warmup_fraction: float = 0.0
    lr_mult: Mapping[str, float] = attrs.field(factory=dict)  # part (FREEZABLE names) -> lr multiplier
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 0.0  # global grad-norm clipping; 0 disables
    loss_reduction: Literal["token", "micro_batch", "sample"] = "token"
    seed: int = 42
    bad_step_policy: Literal["stop", "skip"] = "stop"  # NaN / Inf loss or grad norm
    max_bad_steps: int = 3  # consecutive skipped steps before stopping anyway


@attrs.frozen(kw_only=True)
class CheckpointSection:
    save: str = ""  # run folder: checkpoints, resolved config, logs, metrics
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 0  # 0: keep all
    save_optim: bool = True
    save_rng: bool = True
    load_optim: bool = True
    load_rng: bool = True
    export_hf: str = ""  # write an HF folder (talker kept) at the end; needs the original HF folder
    hf_dir: str = ""  # the original HF folder for export (default: model.load when it is one)
    # A `save` folder that already holds checkpoints (a restarted or re-submitted job): continue from its
    # newest ("auto"), or stop with an error ("never") rather than train over it.
    resume: Literal["auto", "never"] = "auto"


@attrs.frozen(kw_only=True)
class EvalSection:
    interval: int = 0  # steps between validation-loss runs (and one after the last step); 0: no validation
    iters: int = 1  # global batches scored per run (the same first iters x global_batch_size validation samples each time)


@attrs.frozen(kw_only=True)
class LoraSection:
    """LoRA fine-tuning (omnicore.lora): on when `targets` is non-empty; then only the adapters train
    and checkpoints hold only them (+ optimizer), recording `model.load` as their base."""

    targets: tuple[str, ...] = ()  # --lora-target-modules: MindSpeed (linear_qkv ...), PEFT (q_proj ...) names, or "all"
    r: int = 16  # --lora-r
    alpha: float = 32.0  # --lora-alpha
    dropout: float = 0.0  # --lora-dropout
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    towers: tuple[str, ...] = ("llm",)  # which towers' blocks get adapters: llm, vision, audio
    load: str = ""  # an adapter checkpoint to continue from (its recorded base must be model.load)
    export_peft: str = ""  # write a PEFT adapter folder for the HF thinker at the end


@attrs.frozen(kw_only=True)
class LogSection:
    interval: int = 1
    warmup_steps: int = 2  # excluded from the end-of-run throughput summary
    tensorboard: bool = False
    progress: bool = True
    peak_tflops: float = 0.0  # per device, for MFU (e.g. 989 for an H100 in bf16); 0: MFU not reported


@attrs.frozen(kw_only=True)
class OpsSection:
    backend: str = "auto"


@attrs.frozen(kw_only=True)
class RunConfig:
    model: ModelSection
    train: TrainSection
    data: DataSection = attrs.field(factory=DataSection)
    parallel: ParallelSection = attrs.field(factory=ParallelSection)
    checkpoint: CheckpointSection = attrs.field(factory=CheckpointSection)
    eval: EvalSection = attrs.field(factory=EvalSection)
    lora: LoraSection = attrs.field(factory=LoraSection)
    log: LogSection = attrs.field(factory=LogSection)
    ops: OpsSection = attrs.field(factory=OpsSection)

    def __attrs_post_init__(self) -> None:
        bad = [p for p in self.model.freeze if p not in FREEZABLE]
        if bad:
            raise ConfigError(f"model.freeze: unknown part(s) {bad}; choose from {list(FREEZABLE)}")
        bad = [p for p in self.train.lr_mult if p not in FREEZABLE]
        if bad:
            raise ConfigError(f"train.lr_mult: unknown part(s) {bad}; choose from {list(FREEZABLE)}")
        if self.data.micro_batch_tokens < 0:
            raise ConfigError(f"data.micro_batch_tokens must be >= 0 (0: no token budget), got {self.data.micro_batch_tokens}")
        if self.eval.interval < 0:
            raise ConfigError(f"eval.interval must be >= 0 (0: no validation), got {self.eval.interval}")
        for key, value in (("data.micro_batch_size", self.data.micro_batch_size), ("data.global_batch_size", self.data.global_batch_size),
                           ("train.train_iters", self.train.train_iters), ("log.interval", self.log.interval),
                           ("eval.iters", self.eval.iters)):  # fmt: skip
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check / convert a TOML value to the annotated type; ConfigError naming `key` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if attrs.has(tp):
        return _structure(tp, value, key)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _structure(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = attrs.fields_dict(cls)
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f" (valid keys: {', '.join(fields)})"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
    missing = [k for k, f in fields.items() if f.default is attrs.NOTHING and k not in data]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(prefix + k for k in missing)}")
    try:
        return cls(**{k: _convert(hints[k], v, prefix + k) for k, v in data.items()})
    except TypeError as err:
        raise ConfigError(f"{where or 'config'}: {err}") from None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--section.key=value` (TOML value syntax; bare words are strings) into a nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        path, _, raw = item[2:].partition("=")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: Mapping) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged.get(k, {}), v) if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping) else v
    return merged


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config; relative paths inside stay as written (resolved against the file's folder by the caller)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: run config not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None
    try:
        return _structure(RunConfig, _merge(data, parse_overrides(overrides)), "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (every key, defaults included)."""
    lines = []
    for section, value in attrs.asdict(cfg, recurse=False).items():
        lines.append(f"[{section}]")
        for key, v in attrs.asdict(value).items():
            if v is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")
