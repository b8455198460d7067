"""The MindSpeed-MM Qwen2.5-Omni recipe mapped onto omnicore's run config: one row per flag or field.

Each row covers one thing a recipe user may write (reference mindspeed_recipe.md section 4): an
exported variable, a shell variable, a torchrun flag, a command, a `pretrain_vlm.py` flag, a
model.json field or a data.json field. Its `kind` (see KINDS) says what `omnicore_dist.migrate` does
with it. The data.json rows come from the data pipeline's own field rules (`omnicore.data.config.FIELDS`),
because that pipeline reads the file itself. `python -m omnicore_dist.recipe_map` prints the table
that docs/migrate.md holds; a test keeps the two equal.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from omnicore.data.config import FIELDS
from omnicore.layout import parse_layer_list
from omnicore_dist.env import NPU_ENV

__all__ = ["KINDS", "SECTIONS", "Row", "ROWS", "lookup", "hf_value", "markdown_table", "main"]

KINDS = {
    "key": "sets the run-config key(s) named",
    "checked": "compared with the checkpoint's config.json (or the layer lists); a contradiction is an error",
    "data": "stays in data.json, which omnicore's data pipeline reads through `data.config`",
    "via": "a shell variable: its value reaches omnicore through the flag that uses it",
    "not needed": "omnicore does this itself, or takes it from elsewhere",
    "ignored": "has no effect in omnicore",
    "refused": "omnicore cannot honour it: an error (some rows accept one harmless value)",
}

# Where a row's name is written: exported variable, shell variable, torchrun flag, a command of the
# script, a pretrain_vlm.py flag, a model.json field (dotted path), a data.json field.
SECTIONS = ("env", "var", "launch", "command", "flag", "model", "data")


@attrs.frozen(kw_only=True)
class Row:
    """One recipe flag / variable / field and what the migration does with it.

    `parse` turns a script string into a typed value (JSON values arrive typed); `keys` turns the
    value into run-config entries for "key" rows (a ValueError there is reported against
    the flag); `hf` reads the config.json value a "checked" row must equal. `expect` lists the values
    a not needed / ignored row takes silently (others warn) and the one value a refused row accepts.
    """

    section: str
    name: str
    group: str
    kind: str
    target: str = ""
    why: str = ""
    recipe: Any = None
    expect: tuple = ()
    arity: int | str = 1  # script flags: 0 (a switch), 1, or "+" (one or more values)
    path: bool = False  # the value is a path, rewritten relative to the output file
    parse: Callable[[str], Any] = str
    keys: Callable[[Any], dict[str, Any]] | None = None
    hf: Callable[[Mapping[str, Any]], Any] | None = None

    def __attrs_post_init__(self) -> None:
        if self.kind not in KINDS or self.section not in SECTIONS:
            raise ValueError(f"row {self.name}: bad kind {self.kind!r} or section {self.section!r}")


def _set(*targets: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: dict.fromkeys(targets, value)


def _const(target: str, value: Any) -> Callable[[Any], dict[str, Any]]:
    return lambda _: {target: value}


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _count(value: Any) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def _freeze(*parts: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {"model.freeze": parts} if _bool(value) else {}


def _layers(target: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {target: parse_layer_list(value, target)}


def _schedule(value: str) -> dict[str, Any]:
    if value not in ("cosine", "linear", "constant"):
        raise ValueError("omnicore's schedules are cosine, linear and constant")
    return {"train.lr_decay_style": value}


def _at(*paths: str) -> Callable[[Mapping[str, Any]], Any]:
    """A reader of the first present dotted path in the thinker's config.json section."""

    def read(thinker: Mapping[str, Any]) -> Any:
        for path in paths:
            node: Any = thinker
            for part in path.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            if node is not None:
                return node
        raise KeyError(" / ".join(paths))

    return read


def hf_value(row: Row, hf: Mapping[str, Any]) -> Any:
    """The config.json value a checked row compares with (`hf` is the full or thinker-only dict)."""
    return row.hf(hf.get("thinker_config", hf))


# The script: exported variables, shell variables, the launch line and the other commands.

_ENV_GROUP = "4.1 environment variables"
_NPU_WHY = "the launcher sets this default on NPU hosts unless you export another value (omnicore_dist.env.NPU_ENV)"
_ENV = [
    Row(section="env", name=name, group=_ENV_GROUP, kind="not needed", why=f"{_NPU_WHY}: {why}", recipe=value, expect=(value,))
    for name, (value, why) in NPU_ENV.items()
] + [
    Row(section="env", name="CUDA_DEVICE_MAX_CONNECTIONS", group=_ENV_GROUP, kind="not needed", recipe="1",
        why="it only satisfies a Megatron check; omnicore has no such check"),
    Row(section="env", name="HCCL_EXEC_TIMEOUT", group=_ENV_GROUP, kind="ignored",
        why="the launcher leaves it to CANN; export it in your shell if you need it (collectives also time out after parallel.timeout_minutes)"),
    Row(section="env", name="NPUS_PER_NODE", group=_ENV_GROUP, kind="not needed", recipe="8",
        why="a launch setting: the launcher reads NPUS_PER_NODE from the environment, or take --nproc-per-node"),
]  # fmt: skip

_VAR_GROUP = "4.1 shell variables"
_LAUNCH_VARS = {"MASTER_ADDR": ("--master-addr", "localhost"), "MASTER_PORT": ("--master-port", "6000"), "NNODES": ("--nnodes", "1"),
                "NODE_RANK": ("--node-rank", "0")}
_VARS = [
    Row(section="var", name="NPUS_PER_NODE", group=_VAR_GROUP, kind="via", recipe="8", target="torchrun --nproc_per_node",
        why="launch setting: python -m omnicore_dist.launch --nproc-per-node (or NPUS_PER_NODE in the environment)"),
    *[Row(section="var", name=var, group=_VAR_GROUP, kind="via", target=f"torchrun --{var.lower()}", recipe=value,
          why=f"launch setting: python -m omnicore_dist.launch {flag} (or {var} in the environment)")
      for var, (flag, value) in _LAUNCH_VARS.items()],
    Row(section="var", name="WORLD_SIZE", group=_VAR_GROUP, kind="via", target="DP", recipe="$(($NPUS_PER_NODE*$NNODES))",
        why="the launcher's world size is nproc-per-node x nnodes; the migration uses it to check the batch split"),
    Row(section="var", name="MM_DATA", group=_VAR_GROUP, kind="via", target="--mm-data", path=True, recipe="./examples/qwen2.5omni/data_7b.json",
        why="data.config points at the data.json given to the migration"),
    Row(section="var", name="MM_MODEL", group=_VAR_GROUP, kind="via", target="--mm-model", path=True,
        recipe="./examples/qwen2.5omni/model_7b.json",
        why="the model.json given to the migration becomes model / parallel keys"),
    Row(section="var", name="MM_TOOL", group=_VAR_GROUP, kind="via", target="--mm-tool", path=True, recipe="./mindspeed_mm/tools/tools.json",
        why="see --mm-tool"),
    Row(section="var", name="LOAD_PATH", group=_VAR_GROUP, kind="via", target="--load", path=True, recipe="ckpt/mm_path/Qwen2.5-VL-Omni-7B",
        why="see --load"),
    Row(section="var", name="SAVE_PATH", group=_VAR_GROUP, kind="via", target="--save", path=True, recipe="save_dir", why="see --save"),
    Row(section="var", name="TP", group=_VAR_GROUP, kind="via", target="--tensor-model-parallel-size", recipe="1", why="parallel.tp"),
    Row(section="var", name="PP", group=_VAR_GROUP, kind="via", target="--pipeline-model-parallel-size", recipe="2",
        why="the number of entries of parallel.llm_pp_layers"),
    Row(section="var", name="CP", group=_VAR_GROUP, kind="via", target="--context-parallel-size", recipe="1", why="must be 1"),
    Row(section="var", name="MBS", group=_VAR_GROUP, kind="via", target="--micro-batch-size", recipe="1", why="data.micro_batch_size"),
    Row(section="var", name="GRAD_ACC_STEP", group=_VAR_GROUP, kind="via", target="GBS", recipe="48",
        why="omnicore derives the accumulation steps: global batch / (micro batch x data-parallel size)"),
    Row(section="var", name="DP", group=_VAR_GROUP, kind="via", target="GBS", recipe="$(($WORLD_SIZE/$TP/$PP/$CP))",
        why="omnicore derives the data-parallel size: world / (tp x pp)"),
    Row(section="var", name="GBS", group=_VAR_GROUP, kind="via", target="--global-batch-size", recipe="$(($MBS*$GRAD_ACC_STEP*$DP))",
        why="data.global_batch_size"),
]  # fmt: skip

_LAUNCH_GROUP = "4.1 launch"
_LAUNCH = [
    *[Row(section="launch", name=f"--{flag}", group=_LAUNCH_GROUP, kind="not needed",
          why=f"a launch setting, not run config: python -m omnicore_dist.launch --{flag.replace('_', '-')} ... run.toml")
      for flag in ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port")],
    Row(section="command", name="torchrun", group=_LAUNCH_GROUP, kind="not needed",
        why="python -m omnicore_dist.launch starts torch.distributed.run itself when more than one process is asked for"),
    Row(section="command", name="pretrain_vlm.py", group=_LAUNCH_GROUP, kind="not needed",
        why="the entry point is python -m omnicore_dist.launch run.toml"),
    Row(section="command", name="tee", group=_LAUNCH_GROUP, kind="not needed",
        why="every run writes a plain-text log and a JSONL metrics file into its run folder (checkpoint.save)"),
    Row(section="command", name="source", group=_LAUNCH_GROUP, kind="not needed",
        why="source CANN's set_env.sh in your shell before launching; python -m omnicore_dist.env reports whether it is set"),
    Row(section="command", name="chmod", group="4.1 post-processing", kind="ignored",
        why="omnicore leaves permissions of its logs and checkpoints to your umask; chmod afterwards for the recipe's 440 / 750 / 640"),
    Row(section="command", name="throughput report", group="4.1 post-processing", kind="not needed",
        why="the end-of-run summary gives step time and tokens/s per device and for the job, excluding warm-up steps (log.warmup_steps)"),
]  # fmt: skip


# pretrain_vlm.py flags: GPT_ARGS, MM_ARGS, OUTPUT_ARGS, the optional flags, and a few common Megatron ones.

def _key(name: str, group: str, target: str, parse: Callable[[str], Any], recipe: Any, why: str = "", **kw) -> Row:
    keys = kw.pop("keys", _set(target))
    return Row(section="flag", name=name, group=group, kind="key", target=target, parse=parse, recipe=recipe,
               why=why or f"the value, as {parse.__name__}", keys=keys, **kw)  # fmt: skip


def _switch(name: str, group: str, target: str, value: Any, why: str = "", **kw) -> Row:
    return Row(section="flag", name=name, group=group, kind=kw.pop("kind", "key"), target=target, arity=0,
               why=why or f"sets {target} = {str(value).lower()}", keys=_const(target, value), **kw)  # fmt: skip


def _flag(name: str, group: str, kind: str, why: str, *, recipe: Any = None, arity: int | str = 1, **kw) -> Row:
    return Row(section="flag", name=name, group=group, kind=kind, why=why, recipe=recipe, arity=arity, **kw)


_OPS = "the ops backend (fused attention, norms, rope, SwiGLU) is chosen per device automatically (ops.backend = \"auto\")"
_SHAPE = "model structure comes from the checkpoint's config.json"
_G_PAR, _G_TOK, _G_OPT, _G_TRN, _G_CKPT = (f"4.1 GPT_ARGS: {g}" for g in (
    "parallelism and batch", "tokenizer and model shape", "optimiser", "other training switches", "checkpoint and loading"))
_G_MM, _G_OUT, _G_OPTN, _G_EXTRA = "4.1 MM_ARGS", "4.1 OUTPUT_ARGS", "4.1 optional flags", "Megatron flags outside the recipe"

_FLAGS = [
    _flag("--use-mcore-models", _G_PAR, "not needed", "omnicore has one model implementation", arity=0),
    _key("--tensor-model-parallel-size", _G_PAR, "parallel.tp", int, 1),
    _flag("--pipeline-model-parallel-size", _G_PAR, "checked", parse=int, recipe=2, target="len(parallel.llm_pp_layers)",
          why="omnicore's stage count is the length of the layer lists (model.json pipeline_num_layers); the two must agree"),
    _key("--micro-batch-size", _G_PAR, "data.micro_batch_size", int, 1),
    _key("--global-batch-size", _G_PAR, "data.global_batch_size", int, 192,
         why="the value; omnicore accumulates global / (micro x data-parallel) micro-batches per step"),
    _flag("--context-parallel-size", _G_PAR, "refused", "omnicore has no context parallelism", recipe=1, expect=("1",)),
    _flag("--tokenizer-type", _G_TOK, "not needed", "the tokenizer is read from the HF folder (preprocess_parameters.model_name_or_path)",
          recipe="NullTokenizer", expect=("NullTokenizer",)),
    _flag("--vocab-size", _G_TOK, "checked", "must equal the vocabulary of config.json", parse=int, recipe=152064,
          target="config.json text_config.vocab_size", hf=_at("text_config.vocab_size")),
    _key("--seq-length", _G_TOK, "data.seq_length", int, 3072),
    _flag("--make-vocab-size-divisible-by", _G_TOK, "not needed", f"the vocabulary is never padded; {_SHAPE}", recipe=1, expect=("1",)),
    _flag("--normalization", _G_TOK, "not needed", _SHAPE, recipe="RMSNorm", expect=("RMSNorm",)),
    _flag("--use-fused-rmsnorm", _G_TOK, "not needed", _OPS, arity=0),
    _flag("--swiglu", _G_TOK, "not needed", _SHAPE, arity=0),
    _flag("--use-fused-swiglu", _G_TOK, "not needed", _OPS, arity=0),
    _flag("--no-masked-softmax-fusion", _G_TOK, "not needed", _OPS, arity=0),
    _key("--lr", _G_OPT, "train.lr", float, 1e-5),
    Row(section="flag", name="--lr-decay-style", group=_G_OPT, kind="key", target="train.lr_decay_style", recipe="cosine",
        why="cosine, linear or constant; other styles are refused", keys=_schedule),
    _key("--weight-decay", _G_OPT, "train.weight_decay", float, 0.0),
    _key("--train-iters", _G_OPT, "train.train_iters", int, 10000),
    _key("--lr-warmup-fraction", _G_OPT, "train.lr_warmup_fraction", float, 0.1),
    _key("--clip-grad", _G_OPT, "train.clip_grad", float, 0.0, why="the value; 0 disables clipping in both"),
    _key("--adam-beta1", _G_OPT, "train.adam_beta1", float, 0.9),
    _key("--adam-beta2", _G_OPT, "train.adam_beta2", float, 0.999),
    _flag("--no-gradient-accumulation-fusion", _G_TRN, "not needed",
          "omnicore always accumulates gradients in one flat fp32 buffer", arity=0),
    _key("--seed", _G_TRN, "train.seed, data.seed", int, 42, why="one seed for training and data order, as Megatron seeds every generator from it",
         keys=_set("train.seed", "data.seed")),
    _flag("--bf16", _G_TRN, "not needed", "model.dtype = \"auto\" trains in bf16 on accelerators (fp32 on CPU)", arity=0),
    _flag("--variable-seq-lengths", _G_TRN, "not needed", "omnicore's micro-batches always take their own length", arity=0),
    _switch("--use-distributed-optimizer", _G_TRN, "parallel.distributed_optimizer", True),
    _key("--distributed-timeout-minutes", _G_TRN, "parallel.timeout_minutes", float, 600),
    _flag("--use-flash-attn", _G_TRN, "not needed", _OPS, arity=0),
    _key("--load", _G_CKPT, "model.load", str, "$LOAD_PATH", path=True,
         why="the path; omnicore loads an HF folder directly, or an omnicore native checkpoint, not MindSpeed-MM's mp_rank_* folders"),
    _switch("--no-load-optim", _G_CKPT, "checkpoint.load_optim", False),
    _switch("--no-load-rng", _G_CKPT, "checkpoint.load_rng", False),
    _switch("--no-save-optim", _G_CKPT, "checkpoint.save_optim", False),
    _switch("--no-save-rng", _G_CKPT, "checkpoint.save_rng", False),
    _key("--num-workers", _G_CKPT, "data.num_workers", int, 2),
    Row(section="flag", name="--mm-data", group=_G_MM, kind="key", target="data.config", recipe="$MM_DATA", path=True,
        why="data.config names the data.json given to the migration, relative to the output file"),
    _flag("--mm-model", _G_MM, "not needed", "the model.json given to the migration is folded into model.* and parallel.* keys",
          recipe="$MM_MODEL", path=True),
    _flag("--mm-tool", _G_MM, "ignored", "MindSpeed-MM's tools.json has no omnicore equivalent",
          recipe="$MM_TOOL", path=True),
    _key("--log-interval", _G_OUT, "log.interval", int, 1),
    _key("--save-interval", _G_OUT, "checkpoint.save_interval", int, 10000),
    _key("--eval-interval", _G_OUT, "eval.interval", int, 10000,
         why="validation loss every that many steps and after the last (needs a validation split or file in data.json)"),
    _key("--eval-iters", _G_OUT, "eval.iters", int, 5000, why="global batches of validation samples scored per evaluation"),
    _key("--save", _G_OUT, "checkpoint.save", str, "$SAVE_PATH", path=True, why="the path: the run folder (checkpoints, logs, metrics)"),
    _flag("--ckpt-format", _G_OUT, "not needed", "omnicore writes its native checkpoint format; checkpoint.export_hf adds an HF export",
          recipe="torch"),
    _flag("--log-tps", _G_OUT, "not needed", "tokens/s per device and tokens per sample are always logged", arity=0),
    _flag("--distributed-backend", _LAUNCH_GROUP, "not needed", "the process-group backend is chosen from the device (omnicore_dist.mesh)",
          recipe="nccl"),
    # optional flags of the recipe's README and docs
    _flag("--hetero-parallel", _G_OPTN, "not needed", arity=0, target="parallel.vit_tp, parallel.audio_tp",
          why="per-tower tensor parallelism is always on; with this flag model.json's encoder tp becomes parallel.vit_tp / audio_tp, "
              "and an encoder TP below parallel.tp runs the encoders data-parallel inside each LLM TP group (hetero parallel)"),
    _flag("--hetero-encoder-mbs-scale", _G_OPTN, "ignored",
          "omnicore runs the encoders on each micro-batch's own media; there is no separate encoder micro-batch (speed only, same result)"),
    _flag("--enable-dummy-optimizer", _G_OPTN, "not needed",
          "omnicore's optimizer holds only trainable parameters (frozen parts get no state), and a pipeline stage with nothing to "
          "train runs forward and backward with an empty one, so no placeholder is needed", arity=0),
    _key("--lora-target-modules", _G_OPTN, "lora.targets", str, None, arity="+", keys=lambda v: {"lora.targets": tuple(v)},
         why="the layers to adapt, by the recipe's names (linear_qkv linear_proj linear_fc1 linear_fc2), PEFT's (q_proj ...) or all"),
    _key("--lora-r", _G_OPTN, "lora.r", int, None),
    _key("--lora-alpha", _G_OPTN, "lora.alpha", float, None),
    _key("--lora-dropout", _G_OPTN, "lora.dropout", float, None),
    _key("--load-base-model", _G_OPTN, "model.load", str, None, path=True,
         why="the frozen base under LoRA adapters; the recipe's --load then names the adapter checkpoint, which becomes lora.load"),
    _switch("--calculate-per-sample-loss", _G_OPTN, "train.loss_reduction", "sample",
            why="\"sample\": each sample's mean token loss, averaged; without either loss flag the recipe takes Megatron's "
                "per-micro-batch mean, written as \"micro_batch\""),
    _switch("--calculate-per-token-loss", _G_OPTN, "train.loss_reduction", "token",
            why="\"token\": the mean over every label token of the global batch (omnicore's own default)"),
    _flag("--virtual-pipeline-model-parallel-size", _G_OPTN, "refused",
          "omnicore's pipeline schedule has one model chunk per stage (no interleaving)", expect=("1",)),
    _flag("--encoder-dp-balance", _G_OPTN, "ignored",
          "omnicore does not move encoder work between data-parallel ranks (speed only, same result)", arity=0),
    _flag("--use-data-balance", _G_OPTN, "ignored",
          "omnicore does not rebalance samples across data-parallel ranks (speed only, same result)", arity=0),
    _flag("--recompute-skip-core-attention", _G_OPTN, "ignored",
          "omnicore recomputes whole layers (model.recompute); there is no finer granularity", arity=0),
    _flag("--trust-remote-code", _G_OPTN, "not needed", "nothing from a checkpoint is ever executed", arity=0),
    # common Megatron flags a user may have added; omnicore has an equivalent
    _key("--min-lr", _G_EXTRA, "train.min_lr", float, None),
    _key("--lr-warmup-iters", _G_EXTRA, "train.lr_warmup_iters", int, None),
    _key("--adam-eps", _G_EXTRA, "train.adam_eps", float, None),
    _flag("--recompute-granularity", _G_EXTRA, "key", "with --recompute-method and --recompute-num-layers: full + uniform -> "
          "\"full\", full + block N -> N (first N layers), selective -> not carried (warning)", target="model.recompute.llm"),
    _flag("--recompute-method", _G_EXTRA, "key", "see --recompute-granularity", target="model.recompute.llm"),
    _flag("--recompute-num-layers", _G_EXTRA, "key", "see --recompute-granularity", target="model.recompute.llm", parse=int),
    _flag("--fp16", _G_EXTRA, "refused", "omnicore trains in bf16 or fp32; fp16 with loss scaling is not supported", arity=0),
    _switch("--sequence-parallel", _G_EXTRA, "parallel.sequence_parallel", True),
]  # fmt: skip


# model.json: structural fields are checked against config.json; the rest map to keys or are not needed.

_DTYPE = "model.dtype = \"auto\" picks bf16 on accelerators, fp32 on CPU"
_NO_DROPOUT = "omnicore fine-tunes without dropout (Qwen2.5-Omni's published config has none)"
_FUSED_ROPE = "the rotary kernel is chosen with the ops backend"


def _checked(path: str, group: str, recipe: Any, *hf_paths: str, hf: Callable | None = None, doc: str = "") -> Row:
    target = doc or "config.json " + " / ".join(hf_paths)
    return Row(section="model", name=path, group=group, kind="checked", recipe=recipe, target=target,
               why="must equal config.json; structure is read only from there", hf=hf or _at(*hf_paths))  # fmt: skip


def _fixed(path: str, group: str, recipe: Any, why: str, kind: str = "not needed") -> Row:
    """A field omnicore does not need, whose recipe value is the only one it is consistent with."""
    return Row(section="model", name=path, group=group, kind=kind, recipe=recipe, expect=(recipe,), why=why)


def _tower_rows(prefix: str, group: str, *, dtype: bool = True) -> list[Row]:
    """Fields every MindSpeed-MM tower config repeats."""
    rows = [_fixed(f"{prefix}.bf16", group, True, _DTYPE), _fixed(f"{prefix}.params_dtype", group, "bf16", _DTYPE)]
    if dtype:
        rows.append(_fixed(f"{prefix}.fp16", group, False, f"fp16 is not supported; {_DTYPE}"))
    return rows


def _recompute_rows(prefix: str, group: str, tower: str) -> list[Row]:
    why = (f"with {prefix}.recompute_method and recompute_num_layers: full + uniform -> \"full\", full + block N -> N "
           "(first N layers), selective -> not carried (warning)")  # fmt: skip
    return [
        Row(section="model", name=f"{prefix}.recompute_granularity", group=group, kind="key", target=f"model.recompute.{tower}", why=why),
        Row(section="model", name=f"{prefix}.recompute_method", group=group, kind="key", target=f"model.recompute.{tower}",
            why=f"see {prefix}.recompute_granularity"),
        Row(section="model", name=f"{prefix}.recompute_num_layers", group=group, kind="key", target=f"model.recompute.{tower}",
            why=f"see {prefix}.recompute_granularity"),
    ]  # fmt: skip


def _siblings(prefix: str, group: str, tp_key: str) -> list[Row]:
    """The per-encoder tp / pp / cp that only --hetero-parallel reads."""
    return [
        Row(section="model", name=f"{prefix}.tp", group=group, kind="key", target=tp_key, recipe=1, keys=lambda v: {tp_key: _count(v)},
            why=f"{tp_key} with --hetero-parallel; without it the recipe ignores this and the encoder uses the LLM's TP "
                f"(omnicore's default when {tp_key} is unset)"),
        Row(section="model", name=f"{prefix}.pp", group=group, kind="refused", recipe=1, expect=(1,),
            why="an encoder has no pipeline of its own; its stage placement is its pipeline_num_layers list"),
        Row(section="model", name=f"{prefix}.cp", group=group, kind="refused", recipe=1, expect=(1,), why="omnicore has no context parallelism"),
    ]  # fmt: skip


_G_TOP, _G_VIT, _G_PROJ, _G_IMG = "4.2 top level", "4.2 image_encoder.vision_encoder", "4.2 image_encoder.vision_projector", "4.2 image_encoder"
_G_AUD, _G_AUDS, _G_TXT = "4.2 audio_encoder.audio_encoder", "4.2 audio_encoder", "4.2 text_decoder"
_V, _P, _A, _T = "image_encoder.vision_encoder", "image_encoder.vision_projector", "audio_encoder.audio_encoder", "text_decoder"
_IMG_CONTEXT = (
    "omnicore reads both placeholder ids from config.json (image_token_index 151655, video_token_index 151656) and takes image "
    "and video samples in one run; the recipe needed 151655 for image data and 151656 for video data"
)

_MODEL = [
    _fixed("model_id", _G_TOP, "qwen2_5vl", "omnicore builds the Qwen2.5-Omni thinker; the model comes from config.json"),
    Row(section="model", name="img_context_token_id", group=_G_TOP, kind="not needed", recipe=151656, why=_IMG_CONTEXT),
    _checked("vision_start_token_id", _G_TOP, 151652, "vision_start_token_id"),
    _fixed("text_encoder", _G_TOP, None, "Qwen2.5-Omni has no separate text encoder"),
    _fixed("video_encoder", _G_TOP, None, "video frames go through the vision encoder"),
    # image_encoder.vision_encoder
    _fixed(f"{_V}.model_id", _G_VIT, "qwen2vit", "the vision tower of the thinker"),
    _checked(f"{_V}.num_layers", _G_VIT, 32, "vision_config.depth"),
    _checked(f"{_V}.hidden_size", _G_VIT, 1280, "vision_config.hidden_size"),
    _checked(f"{_V}.ffn_hidden_size", _G_VIT, 3420, "vision_config.intermediate_size"),
    _checked(f"{_V}.intermediate_size", _G_VIT, 3420, "vision_config.intermediate_size"),
    _checked(f"{_V}.llm_hidden_size", _G_VIT, 3584, "vision_config.out_hidden_size"),
    _fixed(f"{_V}.gated_linear_unit", _G_VIT, True, "the vision MLP is SwiGLU, as in the HF model"),
    _checked(f"{_V}.num_attention_heads", _G_VIT, 16, "vision_config.num_heads"),
    _fixed(f"{_V}.hidden_dropout", _G_VIT, 0.0, _NO_DROPOUT),
    _fixed(f"{_V}.attention_dropout", _G_VIT, 0.0, _NO_DROPOUT),
    _checked(f"{_V}.in_channels", _G_VIT, 3, "vision_config.in_channels", "vision_config.in_chans"),
    _checked(f"{_V}.patch_size", _G_VIT, 14, "vision_config.patch_size"),
    _checked(f"{_V}.spatial_merge_size", _G_VIT, 2, "vision_config.spatial_merge_size"),
    _checked(f"{_V}.temporal_patch_size", _G_VIT, 2, "vision_config.temporal_patch_size"),
    _fixed(f"{_V}.layernorm_epsilon", _G_VIT, 1e-6, "the HF vision blocks hard-code RMSNorm eps 1e-6, as omnicore does"),
    _fixed(f"{_V}.normalization", _G_VIT, "RMSNorm", "the vision blocks use RMSNorm, as in the HF model"),
    *_tower_rows(_V, _G_VIT),
    _checked(f"{_V}.activation_func", _G_VIT, "silu", "vision_config.hidden_act"),
    Row(section="model", name=f"{_V}.freeze", group=_G_VIT, kind="key", target="model.freeze", recipe=True,
        why="true adds \"vision\"", keys=_freeze("vision")),
    _fixed(f"{_V}.use_fused_rotary_pos_emb", _G_VIT, True, _FUSED_ROPE),
    _fixed(f"{_V}.post_layer_norm", _G_VIT, False, "the Omni ViT has no norm after its last block (the merger has its own)"),
    Row(section="model", name=f"{_V}.pipeline_num_layers", group=_G_VIT, kind="key", target="parallel.vit_pp_layers",
        recipe=[32, 0], why="the list, one entry per stage", keys=_layers("parallel.vit_pp_layers")),
    Row(section="model", name=f"{_V}.tokens_per_second", group=_G_VIT, kind="not needed", recipe=2,
        why="temporal rotary positions use config.json's position_id_per_seconds (25 for Qwen2.5-Omni)"),
    _checked(f"{_V}.window_attn_size", _G_VIT, 112, "vision_config.window_size"),
    _checked(f"{_V}.fullatt_block_indexes", _G_VIT, [7, 15, 23, 31], "vision_config.fullatt_block_indexes"),
    _fixed(f"{_V}.attention_mask_type", _G_VIT, "general", "attention is varlen over cu_seqlens; no mask is built"),
    *_recompute_rows(_V, _G_VIT, "vision"),
    # image_encoder.vision_projector
    _fixed(f"{_P}.model_id", _G_PROJ, "lnmlp", "the patch merger (RMSNorm + 2-layer MLP) of the HF model"),
    _fixed(f"{_P}.num_layers", _G_PROJ, 1, "the merger is one MLP"),
    _fixed(f"{_P}.gated_linear_unit", _G_PROJ, False, "the merger MLP is not gated"),
    _fixed(f"{_P}.bias_activation_fusion", _G_PROJ, False, _OPS),
    _fixed(f"{_P}.add_bias_linear", _G_PROJ, True, "the merger's linears have biases, as in the HF model"),
    _checked(f"{_P}.input_size", _G_PROJ, 1280, "vision_config.hidden_size"),
    _checked(f"{_P}.hidden_size", _G_PROJ, 3584, "vision_config.out_hidden_size"),
    _checked(f"{_P}.ffn_hidden_size", _G_PROJ, 5120, doc="config.json vision_config.hidden_size x spatial_merge_size^2",
             hf=lambda t: _at("vision_config.hidden_size")(t) * _at("vision_config.spatial_merge_size")(t) ** 2),
    _fixed(f"{_P}.activation_func", _G_PROJ, "gelu", "the merger MLP uses GELU, as in the HF model"),
    *_tower_rows(_P, _G_PROJ, dtype=False),
    Row(section="model", name=f"{_P}.freeze", group=_G_PROJ, kind="key", target="model.freeze", recipe=True,
        why="true adds \"vision_merger\"", keys=_freeze("vision_merger")),
    _fixed(f"{_P}.layernorm_epsilon", _G_PROJ, 1e-6, "the merger's RMSNorm eps is 1e-6 in the HF model"),
    _fixed(f"{_P}.normalization", _G_PROJ, "RMSNorm", "the merger normalises with RMSNorm, as in the HF model"),
    *_siblings("image_encoder", _G_IMG, "parallel.vit_tp"),
    # audio_encoder.audio_encoder
    _fixed(f"{_A}.model_id", _G_AUD, "qwen_omni", "the Whisper-style audio tower of the thinker"),
    _checked(f"{_A}.num_layers", _G_AUD, 32, "audio_config.encoder_layers"),
    _checked(f"{_A}.hidden_size", _G_AUD, 1280, "audio_config.d_model"),
    _checked(f"{_A}.ffn_hidden_size", _G_AUD, 5120, "audio_config.encoder_ffn_dim"),
    _fixed(f"{_A}.gated_linear_unit", _G_AUD, False, "the audio MLP is not gated"),
    _checked(f"{_A}.num_attention_heads", _G_AUD, 20, "audio_config.encoder_attention_heads"),
    _fixed(f"{_A}.hidden_dropout", _G_AUD, 0.0, _NO_DROPOUT),
    _fixed(f"{_A}.attention_dropout", _G_AUD, 0.0, _NO_DROPOUT),
    _fixed(f"{_A}.normalization", _G_AUD, "LayerNorm", "the audio blocks use LayerNorm, as in the HF model"),
    *_tower_rows(_A, _G_AUD),
    _checked(f"{_A}.activation_func", _G_AUD, "gelu", "audio_config.activation_function"),
    Row(section="model", name=f"{_A}.freeze", group=_G_AUD, kind="key", target="model.freeze", recipe=True,
        why="true adds \"audio\" and \"audio_proj\" (MindSpeed-MM's audio encoder holds the projection)",
        keys=_freeze("audio", "audio_proj")),
    _fixed(f"{_A}.use_fused_rotary_pos_emb", _G_AUD, True, "the audio tower has sinusoidal positions, no rotary"),
    _fixed(f"{_A}.post_layer_norm", _G_AUD, False, "the audio tower's final LayerNorm (ln_post) is part of the HF model either way"),
    Row(section="model", name=f"{_A}.pipeline_num_layers", group=_G_AUD, kind="key", target="parallel.audio_pp_layers",
        recipe=[32, 0], why="the list, one entry per stage", keys=_layers("parallel.audio_pp_layers")),
    _checked(f"{_A}.d_model", _G_AUD, 1280, "audio_config.d_model"),
    _checked(f"{_A}.num_mel_bins", _G_AUD, 128, "audio_config.num_mel_bins"),
    _checked(f"{_A}.max_source_positions", _G_AUD, 1500, "audio_config.max_source_positions"),
    _checked(f"{_A}.n_window", _G_AUD, 100, "audio_config.n_window"),
    _checked(f"{_A}.scale_embedding", _G_AUD, False, "audio_config.scale_embedding"),
    _checked(f"{_A}.output_dim", _G_AUD, 3584, "audio_config.output_dim"),
    _fixed(f"{_A}.attention_mask_type", _G_AUD, "general", "attention is varlen over the audio chunks; no mask is built"),
    *_recompute_rows(_A, _G_AUD, "audio"),
    *_siblings("audio_encoder", _G_AUDS, "parallel.audio_tp"),
    # text_decoder
    _fixed(f"{_T}.model_id", _G_TXT, "qwen2_5_omni_thinker", "the thinker's Qwen2 decoder"),
    _checked(f"{_T}.num_layers", _G_TXT, 28, "text_config.num_hidden_layers"),
    Row(section="model", name=f"{_T}.pipeline_num_layers", group=_G_TXT, kind="key", target="parallel.llm_pp_layers",
        recipe=[11, 17], why="the list, one entry per stage; its length must equal --pipeline-model-parallel-size",
        keys=_layers("parallel.llm_pp_layers")),
    _checked(f"{_T}.hidden_size", _G_TXT, 3584, "text_config.hidden_size"),
    _checked(f"{_T}.ffn_hidden_size", _G_TXT, 18944, "text_config.intermediate_size"),
    _checked(f"{_T}.num_attention_heads", _G_TXT, 28, "text_config.num_attention_heads"),
    Row(section="model", name=f"{_T}.seq_length", group=_G_TXT, kind="not needed", recipe=1024,
        why="the sequence length is --seq-length (data.seq_length), as in the recipe"),
    Row(section="model", name=f"{_T}.max_position_embeddings", group=_G_TXT, kind="not needed", recipe=128000,
        why="rotary positions are computed for any length (no table); the length limit is data.seq_length"),
    _checked(f"{_T}.vocab_size", _G_TXT, 152064, "text_config.vocab_size"),
    _checked(f"{_T}.rope_theta", _G_TXT, 1000000.0, "text_config.rope_theta", "text_config.rope_parameters.rope_theta"),
    _checked(f"{_T}.untie_embeddings_and_output_weights", _G_TXT, True, doc="config.json: not text_config.tie_word_embeddings",
             hf=lambda t: not _at("text_config.tie_word_embeddings")(t)),
    _fixed(f"{_T}.disable_bias_linear", _G_TXT, True, "the decoder's linears have no bias except q / k / v, as in the HF model"),
    _fixed(f"{_T}.attention_dropout", _G_TXT, 0.0, _NO_DROPOUT),
    Row(section="model", name=f"{_T}.init_method_std", group=_G_TXT, kind="not needed", recipe=0.01,
        why="weights are loaded from the checkpoint, never initialised"),
    _fixed(f"{_T}.hidden_dropout", _G_TXT, 0.0, _NO_DROPOUT),
    _fixed(f"{_T}.position_embedding_type", _G_TXT, "mrope", "the decoder always uses 3-D M-RoPE"),
    _checked(f"{_T}.mrope_section", _G_TXT, [16, 24, 24], "text_config.rope_scaling.mrope_section",
             "text_config.rope_parameters.mrope_section"),
    _fixed(f"{_T}.rope_scaling", _G_TXT, None, "rotary scaling comes from config.json"),
    _fixed(f"{_T}.normalization", _G_TXT, "RMSNorm", "the decoder uses RMSNorm, as in the HF model"),
    _checked(f"{_T}.activation_func", _G_TXT, "silu", "text_config.hidden_act"),
    _fixed(f"{_T}.use_fused_rotary_pos_emb", _G_TXT, True, _FUSED_ROPE),
    _fixed(f"{_T}.attention_softmax_in_fp32", _G_TXT, True, "attention softmax is always accumulated in fp32"),
    *_tower_rows(_T, _G_TXT, dtype=False),
    _fixed(f"{_T}.parallel_output", _G_TXT, True, "the loss is computed from the logits inside omnicore; nothing to choose"),
    _fixed(f"{_T}.group_query_attention", _G_TXT, True, "grouped-query attention follows config.json's num_key_value_heads"),
    _checked(f"{_T}.num_query_groups", _G_TXT, 4, "text_config.num_key_value_heads"),
    _fixed(f"{_T}.gated_linear_unit", _G_TXT, True, "the decoder MLP is SwiGLU, as in the HF model"),
    _checked(f"{_T}.layernorm_epsilon", _G_TXT, 1e-6, "text_config.rms_norm_eps"),
    _fixed(f"{_T}.add_bias_linear", _G_TXT, False, "only q / k / v have biases, as in the HF model"),
    _fixed(f"{_T}.add_qkv_bias", _G_TXT, True, "q / k / v have biases, as in the HF model"),
    *[Row(section="model", name=f"{_T}.{p}", group=_G_TXT, kind="not needed", recipe=1,
          why=f"the LLM's parallel sizes come from the script's flags (--{flag})")
      for p, flag in (("tp", "tensor-model-parallel-size"), ("pp", "pipeline-model-parallel-size"), ("cp", "context-parallel-size"))],
    Row(section="model", name=f"{_T}.freeze", group=_G_TXT, kind="key", target="model.freeze", why="true adds \"llm\"",
        keys=_freeze("llm")),
    *_recompute_rows(_T, _G_TXT, "llm"),
]  # fmt: skip


# data.json: the data pipeline's own rules (it reads the file itself), with the reasons users need.

_DATA_KIND = {"mapped": "data", "checked": "checked", "ignored": "ignored", "refused": "refused"}
_DATA_WHY = {
    "preprocess_parameters.trust_remote_code": "nothing from a checkpoint is ever executed",
    "basic_parameters.preprocessing_batch_size": "samples are processed one by one into the cache",
    "basic_parameters.preprocess_on_fly": "samples always come from the cache",
    "basic_parameters.async_preprocess": "samples always come from the cache",
    "basic_parameters.async_preprocess_buffer_size": "samples always come from the cache",
    "basic_parameters.enable_thinking": "Qwen2.5-Omni has no thinking mode",
    "attr.packing": "packing is switched by basic_parameters.packing",
    "dataloader_param.dataloader_mode": "omnicore's loader has one mode",
    "dataloader_param.sampler_type": "omnicore's sampler is deterministic per data-parallel rank (data.seed)",
    "dataloader_param.pin_memory": "the runtime decides",
}
# Fields that also set a run-config key, and the collate_param sub-fields.
_DATA_EXTRA = {
    "preprocess_parameters.model_name_or_path": [Row(
        section="data", name="preprocess_parameters.model_name_or_path", group="4.3 preprocess_parameters", kind="key",
        target="checkpoint.hf_dir", path=True, recipe="./ckpt/hf_path/Qwen2.5-Omni-7B", keys=_set("checkpoint.hf_dir"),
        why="the original HF folder: checkpoint.hf_dir (for export), the data pipeline's tokenizer, and the config.json "
            "the structural fields are checked against")],
    "dataloader_param.shuffle": [Row(
        section="data", name="dataloader_param.shuffle", group="4.3 dataloader_param", kind="key", target="data.shuffle",
        recipe=True, keys=lambda v: {"data.shuffle": _bool(v)}, why="the value (the data pipeline reads it too)")],
    "dataloader_param.collate_param": [
        Row(section="data", name="dataloader_param.collate_param.model_name", group="4.3 dataloader_param", kind="ignored",
            recipe="qwen2vl", why="omnicore has one collate for the thinker, packed or padded by basic_parameters.packing"),
        Row(section="data", name="dataloader_param.collate_param.ignore_pad_token_for_loss", group="4.3 dataloader_param",
            kind="not needed", recipe=True, expect=(True,), why="padding never carries a label in omnicore"),
    ],
}  # fmt: skip


def _data_rows() -> list[Row]:
    rows = []
    for field, rule in FIELDS.items():
        if field in _DATA_EXTRA:
            rows += _DATA_EXTRA[field]
            continue
        group = "4.3 " + ("dataset_param" if field.startswith("dataset_param.") else field.split(".")[0])
        kind = _DATA_KIND[rule.kind]
        if kind == "data":
            target, why = f"DataConfig.{rule.target}", rule.note or "read by the data pipeline as it is"
        elif kind == "checked":
            target, why = f"data pipeline: only {rule.allowed!r}", rule.note
        else:
            target, why = "", _DATA_WHY.get(field, rule.note)
        expect = (rule.allowed,) if kind == "checked" else ()
        rows.append(Row(section="data", name=field, group=group, kind=kind, target=target, why=why, expect=expect))
    return rows


ROWS: tuple[Row, ...] = (*_ENV, *_VARS, *_LAUNCH, *_FLAGS, *_MODEL, *_data_rows())
_INDEX = {(r.section, r.name): r for r in ROWS}
if len(_INDEX) != len(ROWS):
    raise RuntimeError("recipe_map: two rows share a section and name")


def lookup(section: str, name: str) -> Row | None:
    """The row for `name` as written in `section` (torchrun flags in either dash style)."""
    if section == "launch":
        name = "--" + name.lstrip("-").replace("-", "_")
    return _INDEX.get((section, name))


def _cell(value: Any) -> str:
    text = "" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """docs/migrate.md's table: the kinds, then one line per row, grouped as in reference section 4."""
    lines = ["", "| handling | meaning |", "|---|---|", *(f"| {kind} | {meaning} |" for kind, meaning in KINDS.items())]
    group = None
    for row in ROWS:
        if row.group != group:
            group = row.group
            lines += ["", f"### {group}", "", "| recipe | recipe value | handling | omnicore | conversion / reason |", "|---|---|---|---|---|"]
        name = f"`{row.name}`" if row.section != "command" else row.name
        lines.append(f"| {name} | {_cell(row.recipe)} | {row.kind} | {_cell(row.target)} | {_cell(row.why)} |")
    return "\n".join(lines[1:]) + "\n"


def main() -> int:
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
