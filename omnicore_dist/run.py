"""A training run from a RunConfig: load, plan, loop, save, resume, export.

`run` is the programmatic entry (tests and the demo pass their samples in); `run_from_file` is what
the launcher calls. The run folder (`checkpoint.save`) holds the resolved `config.toml`, `log.txt`,
`metrics.jsonl`, `loss.png` and the checkpoints (`iter_*`, tracker).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs
import torch
import torch.distributed as dist

from omnicore.checkpoint.commit import META, TRACKER, read_tracker
from omnicore.checkpoint.convert import native_to_hf, side_files
from omnicore.checkpoint.hf import CheckpointError, load_hf
from omnicore.checkpoint.native import NativeCheckpoint, file_plan, resolve_step
from omnicore.checkpoint.pieces import RankPieces
from omnicore.comm import LOCAL
from omnicore.config import ConfigError as ModelConfigError
from omnicore.config import ThinkerConfig, load_config
from omnicore.data.cache import CacheError, SampleCache, open_cache
from omnicore.data.config import DataConfigError, load_data_config
from omnicore.data.errors import DataFormatError, DataStats
from omnicore.data.length import LengthPolicy
from omnicore.data.loader import Loader, MemorySamples
from omnicore.data.sample import SampleContext
from omnicore.data.sampler import StepSampler
from omnicore.data.tokenizer import Tokenizer, load_tokenizer
from omnicore.layout import Layout, LayoutError, Stage, stage_of
from omnicore.models.thinker import param_shapes, tower_depths
from omnicore.ops import resolve
from omnicore.params import Params
from omnicore_dist.checkpointing import SaveRequest, load_resume, save_training, set_rng_state
from omnicore_dist.comm import TPComm
from omnicore_dist.config import ConfigError, RunConfig, load_run_config, to_toml
from omnicore_dist.hetero import (
    check_hetero,
    describe,
    hetero_encoders,
    left_to_first_replica,
    own_state,
    reshard_state,
    run_layout,
    saved_sizes,
    tower_tp_sizes,
)
from omnicore_dist.lora import continue_lora_run, lora_grad_roles, setup_lora
from omnicore_dist.mesh import Mesh, MeshError, build_mesh, close_distributed, gather_lists, init_distributed, local_device
from omnicore_dist.metrics import RunLog, StepRecord
from omnicore_dist.optim import AdamW, OptimStateError, ZeroAdamW, plain_to_zero, zero_to_plain
from omnicore_dist.pipeline import P2P, StageTimes, log_stage_times, stage_lines
from omnicore_dist.preempt import Preemption
from omnicore_dist.schedule import LRSchedule, lr_at
from omnicore_dist.tp import grad_roles, norm_weights, tower_sizes
from omnicore_dist.train import BadStep, GradBuffer, PipelineState, TPState, part_of, pipeline_train_step, recompute_spec, train_step
from omnicore_dist.validate import validate, validation_groups
from omnicore_dist.watchdog import CollectiveTimeout, operation
from omnicore_dist.watchdog import install as install_watchdog

__all__ = ["run", "run_from_file", "Loaded", "load_model", "plan_lines", "memory_estimate", "RUN_ERRORS"]

RUN_ERRORS = (ConfigError, ModelConfigError, CheckpointError, LayoutError, MeshError, OptimStateError, DataConfigError,
              DataFormatError, CacheError, FileExistsError, FileNotFoundError, CollectiveTimeout)  # fmt: skip
# Parts' parameter prefixes, most specific first (the first matching rule wins).
_PART_PATTERNS = {"vision_merger": r"^vision\.merger\.", "vision": r"^vision\.", "audio_proj": r"^audio\.proj\.", "audio": r"^audio\.", "llm": r"^(text\.|lm_head\.)"}


@attrs.frozen
class Loaded:
    cfg: ThinkerConfig
    hf_config: Mapping
    params: Params
    hf_dir: Path | None  # the original HF folder, when known (export, tokenizer)
    hf_files: Mapping[str, Path]
    checkpoint: NativeCheckpoint | None


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _is_native(path: Path) -> bool:
    return (path / TRACKER).exists() or (path / META).exists()


def model_config(cfg: RunConfig, base: Path) -> ThinkerConfig:
    """The model's config alone (config.json, or the checkpoint's meta.json), to validate layouts
    before any weight is read."""
    path = _path(base, cfg.model.load)
    if not path.exists():
        raise FileNotFoundError(f"model.load: {path} does not exist")
    if not _is_native(path):
        return load_config(path)
    meta = resolve_step(path, cfg.model.iteration) / META
    try:
        return ThinkerConfig.from_hf(json.loads(meta.read_text())["hf_config"])
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{meta}: cannot read the model config ({err!r})") from None


def load_model(cfg: RunConfig, base: Path, *, device: torch.device, dtype: torch.dtype, keep: Callable[[str], bool] | None = None,
               pieces: RankPieces | None = None) -> Loaded:  # fmt: skip
    """`model.load` may be an HF folder, a converted release or a training save folder; `keep`
    (native name -> bool) reads only the parameters it accepts (one pipeline stage's), `pieces` only
    one TP rank's pieces of them."""
    path = _path(base, cfg.model.load)
    if not path.exists():
        raise FileNotFoundError(f"model.load: {path} does not exist")
    if not _is_native(path):
        model_cfg, params = load_hf(path, dtype=dtype, device=device, keep=keep, pieces=pieces)
        hf_config = json.loads((path / "config.json").read_text())
        return Loaded(model_cfg, hf_config, params, path, side_files(path), None)
    ckpt = NativeCheckpoint(path, iteration=cfg.model.iteration)
    params = {k: v.to(device) for k, v in ckpt.params(dtype, keep, pieces).items()}
    hf_dir = cfg.checkpoint.hf_dir or ckpt.meta.get("source", {}).get("hf_dir")
    return Loaded(ckpt.cfg, ckpt.meta["hf_config"], params, _path(base, hf_dir) if hf_dir else None, ckpt.hf_files(), ckpt)


def tokenizer_folder(loaded: Loaded, data_model_path: Path | None) -> Path:
    """Where the tokenizer lives: the data config's `model_name_or_path` (MindSpeed keeps the original
    HF folder there), else the HF folder the model came from, else the checkpoint's copied `hf/` files."""
    for folder in (data_model_path, loaded.hf_dir):
        if folder is not None and folder.is_dir():
            return folder
    if loaded.hf_files:
        return next(iter(loaded.hf_files.values())).parent
    raise ConfigError("no tokenizer: set data.config's model_name_or_path or load from an HF folder")


def _build_token(mesh: Mesh) -> str:
    """One random token per run, the same on every rank: `overwrite_cache` then rebuilds a node's
    cache once (by whichever rank takes its lock first), not once per rank."""
    token = [uuid.uuid4().hex]
    if mesh.world > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def load_samples(cfg: RunConfig, base: Path, loaded: Loaded, *, build_token: str, run_dir: Path,
                 show_progress: bool) -> tuple[SampleCache, SampleCache | None, DataStats, Tokenizer]:  # fmt: skip
    """Read `data.config`'s conversations and open their preprocessed caches (training, and validation
    when `eval.interval` asks for it): the data config's `cache_dir` (default `<run folder>/data_cache`),
    built once per node and key (several ranks on one node: one builds, the others wait on the key's lock)."""
    if not cfg.data.config:
        raise ConfigError("data.config is empty: name a data config (MindSpeed data.json)")
    dcfg = load_data_config(_path(base, cfg.data.config), length=LengthPolicy(max_seq_len=cfg.data.seq_length), seed=cfg.data.seed)
    folder = tokenizer_folder(loaded, dcfg.model_name_or_path)
    tokenizer = load_tokenizer(folder)
    tokenizer.check_config(loaded.cfg)
    convs = dcfg.read_conversations()
    ctx = SampleContext.for_data(dcfg, tokenizer, loaded.cfg)

    def cached(convs_part):
        return open_cache(dcfg.cache_dir or run_dir / "data_cache", convs_part, ctx, tokenizer_dir=folder,
                          overwrite=dcfg.overwrite_cache, build_token=build_token, workers=dcfg.num_workers,
                          on_bad_sample=dcfg.on_bad_sample, progress=show_progress)  # fmt: skip

    cache = cached(convs.train)
    stats = convs.stats.merge(cache.stats)
    if not len(cache):
        raise ConfigError(f"data.config: no usable sample ({stats.dropped} dropped)\n{stats.report()}")
    val = cached(convs.val) if cfg.eval.interval and convs.val else None
    return cache, val, stats, tokenizer


def _shared_failure(failure: Exception | None, mesh: Mesh) -> Exception | None:
    """Collective: this rank's error, or another rank's as a ConfigError naming it, so every stage
    stops together when only the first pipeline stage (which reads the data) found a problem."""
    everyone: list = [None] * mesh.world
    dist.all_gather_object(everyone, None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        return failure
    found = next(((r, msg) for r, msg in enumerate(everyone) if msg), None)
    return None if found is None else ConfigError(f"rank {found[0]} (pipeline stage 0, which reads the data) failed: {found[1]}")


def _every_rank(items: list[str], mesh: Mesh) -> list[str]:
    """Collective: every rank's items, each once, in rank order."""
    return list(dict.fromkeys(gather_lists(items, mesh)))


def continue_in_run_folder(cfg: RunConfig, base: Path, run_dir: Path) -> RunConfig:
    """`cfg` loading from `run_dir`'s newest checkpoint when that folder already holds one (a job
    restarted by torchrun's `--max-restarts`, or submitted again after preemption), with the original
    `model.load` kept as the HF folder for export; unchanged when there is none. `checkpoint.resume =
    "never"` makes an existing checkpoint an error instead of silently training over it."""
    tracked = read_tracker(run_dir)
    source = _path(base, cfg.model.load)
    if tracked is None or source.resolve() == run_dir.resolve():
        return cfg
    if cfg.checkpoint.resume == "never":
        raise ConfigError(f"checkpoint.save {run_dir} already holds checkpoints (newest: iteration {tracked}): set "
                          'checkpoint.resume = "auto" to continue from it, or save elsewhere')  # fmt: skip
    is_hf = (source / "config.json").is_file() and not (source / TRACKER).exists() and not (source / META).exists()
    hf_dir = cfg.checkpoint.hf_dir or (str(source) if is_hf else "")
    return attrs.evolve(cfg, model=attrs.evolve(cfg.model, load=str(run_dir), iteration=None),
                        checkpoint=attrs.evolve(cfg.checkpoint, hf_dir=hf_dir))  # fmt: skip


def _dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[setting]


def memory_estimate(cfg: ThinkerConfig, params: Params, trainable: set[str], tokens_per_micro: int, baseline: int) -> dict[str, int]:
    """Bytes per rank: weights, fp32 gradient buffer, optimizer state and activations (analytic,
    per token and layer from what autograd keeps), plus the process baseline measured now."""
    weights = sum(p.numel() * p.element_size() for p in params.values())
    n_train = sum(params[n].numel() for n in trainable)
    masters = sum(params[n].numel() * 4 for n in trainable if params[n].dtype != torch.float32)
    t = cfg.text
    per_token = t.n_layers * (10 * t.hidden + 2 * t.n_kv_heads * t.head_dim + 4 * t.ffn) * 4
    activations = tokens_per_micro * per_token + tokens_per_micro * t.vocab_size * 8
    parts = {"baseline": baseline, "weights": weights, "gradients": n_train * 4, "optimizer": n_train * 8 + masters, "activations": activations}
    parts["total"] = sum(parts.values())
    return parts


def _rss() -> int:
    text = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    m = re.search(r"VmRSS:\s+(\d+)", text)
    return int(m.group(1)) * 1024 if m else 0


def plan_lines(cfg: RunConfig, loaded: Loaded, mesh: Mesh, trainable: set[str], sample: Mapping | None, decode: Callable | None,
               stages: Sequence[Stage] = ()) -> list[str]:  # fmt: skip
    params = loaded.params
    n_all = sum(p.numel() for p in params.values())
    n_train = sum(params[n].numel() for n in trainable)
    tokens = int(sample["input_ids"].numel()) * cfg.data.micro_batch_size if sample is not None else cfg.data.seq_length
    if cfg.data.micro_batch_tokens:  # a budgeted micro-batch: up to the budget, or one longer sample
        tokens = max(cfg.data.micro_batch_tokens, int(sample["input_ids"].numel()) if sample is not None else 0)
    mem = memory_estimate(loaded.cfg, params, trainable, tokens, _rss())
    accum = cfg.data.global_batch_size // (cfg.data.micro_batch_size * mesh.dp)
    lines = [
        f"world {mesh.world}: dp {mesh.dp} x pp {mesh.pp} x tp {mesh.tp}; " + (
            f"{accum} micro-batch(es) of {cfg.data.micro_batch_size} per rank per step" if not cfg.data.micro_batch_tokens else
            f"{accum * cfg.data.micro_batch_size} samples per rank per step, in micro-batches of up to {cfg.data.micro_batch_tokens} tokens"),
        describe(tower_tp_sizes(cfg.parallel)),
        *(stage_lines(stages, cfg.parallel.pipeline_schedule) if len(stages) > 1 else []),
        f"parameters per rank{' (stage 0)' if len(stages) > 1 else ''}: {n_all:,} ({n_train:,} trainable; frozen: "
        + ("the base model (LoRA adapters train)" if cfg.lora.targets else ", ".join(cfg.model.freeze) or "none") + ")",
        "memory estimate per rank: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items()),
    ]
    if sample is not None:
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        shown = []
        for i, tok in enumerate(ids):
            text = decode([tok]) if decode else str(tok)
            labelled = i + 1 < len(labels) and labels[i + 1] != -100  # predicts a labelled next token
            shown.append(f"[{text}]" if labelled else text)
        lines.append("sample 0 (tokens whose next token is trained on are in [brackets]):")
        lines.append(" ".join(shown))
    return lines


def _optimizer(cfg: RunConfig, trainable: Params, mesh: Mesh):
    rules = [(pattern, cfg.train.lr_mult.get(part), None) for part, pattern in _PART_PATTERNS.items()]
    rules.append((r"(\.bias|norm\.weight)$", None, 0.0))  # no weight decay on biases and norms (Megatron)
    hyper = dict(lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps,
                 weight_decay=cfg.train.weight_decay, groups=rules)  # fmt: skip
    if cfg.parallel.distributed_optimizer:
        return ZeroAdamW(trainable, dp_group=mesh.dp_group, **hyper)
    return AdamW(trainable, **hyper)


def _schedule(cfg: RunConfig) -> LRSchedule:
    t = cfg.train
    try:
        return LRSchedule(lr=t.lr, decay_steps=t.train_iters, min_lr=t.min_lr, style=t.lr_decay_style,
                          warmup_steps=t.lr_warmup_iters or 0, warmup_fraction=0.0 if t.lr_warmup_iters else t.lr_warmup_fraction)  # fmt: skip
    except ValueError as err:  # e.g. a warm-up longer than the run
        raise ConfigError(f"train.lr_* / train.train_iters: {err}") from None


def _optimizer_state(optimizer, leave_out: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The state to save, without the entries of the parameters `leave_out` names (a hetero
    encoder's replicas: the first replica of each piece saves the moments they all hold)."""
    state = {k: v for k, v in optimizer.state_dict().items() if k == "step" or not leave_out(k.split(".", 1)[1])}
    if isinstance(optimizer, ZeroAdamW):  # the slice bounds travel with the shard
        meta = optimizer.metadata()
        meta["params"] = {n: bounds for n, bounds in meta["params"].items() if not leave_out(n)}
        state["zero_meta"] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    return state


def _load_optimizer_state(optimizer, saved: Mapping[int, Sequence[Sequence[Mapping[str, torch.Tensor]]]], cfg: ThinkerConfig, mesh: Mesh, *,
                          saved_tp: Mapping[str, int], tower_tp: Mapping[str, int], names: set[str], rule: Callable | None = None,
                          own: bool = False) -> None:  # fmt: skip
    """Load a saved optimizer state (`saved[tp rank][pipeline stage][ZeRO shard]`) into this run's
    optimizer, whatever the saved TP sizes (per tower), pipeline layout, DP size or ZeRO setting: each
    TP rank's state is made plain (ZeRO slicing is per parameter, so that is pure) and joined over the
    stages, states are re-split with the parameters' TP plan (they have the parameters' shapes), this
    stage's parameters (`names`) are kept, and ZeRO-sliced again for this rank when the run uses ZeRO.
    `own`: the layout is unchanged and `saved` holds only this rank's stage and the TP ranks whose
    files hold its pieces' state (its own, and a hetero encoder's first replica), used as they are."""
    plain = {t: _join_stages([_plain_state(shards) for shards in stages]) for t, stages in saved.items()}
    if own:
        state = own_state(plain, mesh.tp_rank, saved_tp)
    else:
        state = reshard_state(cfg, [plain[t] for t in range(len(plain))], saved_tp, tower_tp, mesh.tp_rank, rule)
    state = {k: v for k, v in state.items() if k == "step" or k.split(".", 1)[1] in names}
    if isinstance(optimizer, ZeroAdamW):
        optimizer.load_state_dict(*plain_to_zero(state, mesh.dp, mesh.dp_rank))
    else:
        optimizer.load_state_dict(state)


def _same_layout(meta: Mapping, layout: Layout, depths: Mapping[str, int]) -> bool:
    """Whether a checkpoint was saved under this run's TP sizes and pipeline stages (then each rank's
    saved optimizer states are its own; ZeRO shards are re-sliced for any DP size anyway)."""
    try:
        return Layout.from_json(meta["layout"]).to_json(depths) == layout.to_json(depths)
    except (KeyError, TypeError, ValueError):
        return False


def _join_stages(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One plain state from the saved stages' (disjoint parameters, one shared step count)."""
    joined: dict[str, torch.Tensor] = {}
    for state in states:
        if "step" in joined and int(state["step"]) != int(joined["step"]):
            raise OptimStateError(f"the saved pipeline stages' optimizer states are at different steps ({int(joined['step'])}, {int(state['step'])})")
        joined |= state
    return joined


def _plain_state(shards: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    states = [dict(s) for s in shards]
    metas = [json.loads(bytes(s.pop("zero_meta").tolist()).decode()) if "zero_meta" in s else None for s in states]
    return zero_to_plain(list(zip(states, metas))) if metas[0] is not None else states[0]


def run(cfg: RunConfig, *, base: Path, samples: Sequence[Mapping] | None = None, val_samples: Sequence[Mapping] | None = None,
        dry_run: bool = False, decode: Callable | None = None, stop_after: int | None = None) -> dict:  # fmt: skip
    """Train (or plan, with `dry_run`). `samples` and `val_samples` are processed samples (omnicore.data.collate's
    format) used instead of `data.config`'s; `stop_after` ends the loop early after that many steps (tests of resume)."""
    rank, world = init_distributed(cfg.parallel.timeout_minutes)
    install_watchdog(cfg.parallel.timeout_minutes)
    # per-tower TP sizes (hetero parallel); budgeted micro-batches hold any sample count (the share rule covers them)
    tower_tp = check_hetero(cfg.parallel, None if cfg.data.micro_batch_tokens else cfg.data.micro_batch_size)
    layout = run_layout(tower_tp, cfg.parallel)
    stages = layout.stages(tower_depths(model_config(cfg, base)))  # the layer lists' rules, before any weight is read
    mesh = build_mesh(world, rank, tp=cfg.parallel.tp, pp=len(stages))
    if cfg.data.global_batch_size % (cfg.data.micro_batch_size * mesh.dp):
        raise ConfigError(
            f"data.global_batch_size {cfg.data.global_batch_size} is not divisible by data.micro_batch_size "
            f"{cfg.data.micro_batch_size} x data-parallel size {mesh.dp}"
        )
    torch.manual_seed(cfg.train.seed)
    device = local_device()
    ops = resolve(cfg.ops.backend, device)
    dtype = _dtype(cfg.model.dtype, device)
    run_dir = _path(base, cfg.checkpoint.save or f"runs/{Path(cfg.model.load).name}")
    given, cfg = cfg, (continue_lora_run if cfg.lora.targets else continue_in_run_folder)(cfg, base, run_dir)
    stage = stages[mesh.pp_rank]
    on_stage = (lambda name: stage_of(name, stages) == stage.index) if mesh.pp > 1 else None
    first_stage = mesh.pp_rank == 0
    pieces = None  # a TP rank reads only its own pieces of the weights, never the whole model
    if mesh.tp > 1:
        model_cfg = model_config(cfg, base)  # of what is loaded (a restarted job's own checkpoint)
        file_plan(model_cfg, layout)  # validates head / vocab divisibility before any weight is read
        pieces = RankPieces.of_model(model_cfg, mesh.tp_rank, tower_sizes(mesh.tp, tower_tp))
    loaded = load_model(cfg, base, device=device, dtype=dtype, keep=on_stage, pieces=pieces)
    stats = DataStats()
    source = val_source = None  # only the first pipeline stage reads data; later stages get it in the payloads
    build_token, failure = _build_token(mesh), None
    try:
        if samples is None and first_stage:
            source, val_source, stats, tokenizer = load_samples(cfg, base, loaded, build_token=build_token, run_dir=run_dir,
                                                                show_progress=mesh.is_main and cfg.log.progress)  # fmt: skip
            decode = decode or tokenizer.decode
        elif first_stage:
            source, val_source = MemorySamples(samples), MemorySamples(val_samples) if val_samples else None
        if cfg.eval.interval and first_stage and (val_source is None or not len(val_source)):
            raise ConfigError("eval.interval is set but there are no validation samples: give the data config a validation "
                              "split or file (MindSpeed basic_parameters.val_rate / val_dataset; omnicore val_ratio / val_datasets)")  # fmt: skip
    except RUN_ERRORS as err:
        failure = err
    failure = _shared_failure(failure, mesh) if mesh.pp > 1 else failure
    if failure is not None:
        raise failure
    frozen = set(cfg.model.freeze)
    # One canonical parameter order (the model definition's), whatever the checkpoint's file order:
    # sums over parameters (gradient norm) must not depend on where the weights came from.
    order = [n for n in param_shapes(loaded.cfg) if n in loaded.params]  # this stage's
    trainable = {n: loaded.params[n] for n in order if part_of(n) not in frozen and n != "audio.bos_eos.weight"}
    lora = setup_lora(cfg, base, loaded.cfg, mesh, device, tower_tp, keep=on_stage) if cfg.lora.targets else None
    trainable = lora.adapters if lora else trainable  # LoRA: only the adapters train (and have optimizer state)
    model_params = lora.view(loaded.params, train=True) if lora else loaded.params
    for n, p in loaded.params.items():
        p.requires_grad_(n in trainable)
    tp_state = None
    if mesh.tp > 1:
        sp = cfg.parallel.sequence_parallel
        roles = lora_grad_roles(loaded.cfg, trainable, mesh.tp, tower_tp) if lora else grad_roles(loaded.cfg, trainable, mesh.tp, sequence_parallel=sp, tower_tp=tower_tp)
        comm = TPComm(mesh.tp_group, mesh.tp_rank, mesh.tp, sequence_parallel=sp, encoders=hetero_encoders(mesh, tower_tp))
        tp_state = TPState(comm=comm, roles=roles, weights=norm_weights(roles))
    pipe = PipelineState(stage=stage, p2p=P2P(mesh, device), schedule=cfg.parallel.pipeline_schedule) if mesh.pp > 1 else None
    if dry_run:
        if mesh.is_main:
            print(f"ops backend: {ops.name}; device {device}; dtype {dtype}")
            shown = attrs.evolve(loaded, params=loaded.params | trainable) if lora else loaded
            print("\n".join(plan_lines(cfg, shown, mesh, set(trainable), source.load(0) if len(source) else None, decode, stages=stages)))
        return {}
    optimizer = _optimizer(cfg, trainable, mesh)  # a stage with nothing to train gets an empty one: no work
    leave_out = left_to_first_replica(mesh.tp_rank, tower_sizes(mesh.tp, tower_tp))  # saving: a hetero encoder's moments once
    schedule = _schedule(cfg)
    recompute = recompute_spec(loaded.cfg, cfg.model.recompute)
    grads = GradBuffer(trainable)
    step, consumed = 0, 0
    log = RunLog(run_dir, enabled=mesh.is_main, interval=cfg.log.interval, warmup_steps=cfg.log.warmup_steps,
                 total_steps=cfg.train.train_iters, first_step=1, progress=cfg.log.progress, tensorboard=cfg.log.tensorboard)  # fmt: skip
    resume_from = lora.checkpoint if lora else loaded.checkpoint  # LoRA continues from its adapter checkpoint, never the base's
    resume = load_resume(resume_from, mesh, load_optim=cfg.checkpoint.load_optim, load_rng=cfg.checkpoint.load_rng, names=set(trainable),
                         same_layout=_same_layout(resume_from.meta, layout, tower_depths(loaded.cfg)),
                         draws_random=lora is not None and cfg.lora.dropout > 0) if resume_from else None  # fmt: skip
    if resume is not None:
        step, consumed = resume.step, int(resume.data_state.get("consumed_samples", 0))
        if resume.optimizer is not None:
            _load_optimizer_state(optimizer, resume.optimizer, loaded.cfg, mesh, saved_tp=saved_sizes(resume_from.meta), tower_tp=tower_tp,
                                  names=set(trainable), rule=lora.split_rule(loaded.cfg) if lora else None, own=resume.own_optimizer)  # fmt: skip
        if resume.rng is not None:
            set_rng_state(resume.rng)
        optimizer_from = None if resume.optimizer is None else "own files" if resume.own_optimizer else "re-cut from the saved layout"
        inexact = _every_rank(list(resume.inexact), mesh)  # a rank the saved layout lacked may miss what rank 0 has
        log.message(f"resumed from {resume_from.path} at step {step}, {consumed} samples consumed"
                    + (f"; optimizer state: {optimizer_from}" if optimizer_from else "")
                    + (f"; INEXACT resume, missing: {', '.join(inexact)}" if inexact else ""))  # fmt: skip
        log.event("resume", step=step, path=str(resume_from.path), inexact=inexact, optimizer=optimizer_from)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # set by torchrun's --max-restarts
    if restarts:
        log.message(f"restart {restarts} of this job (torchrun), continuing at step {step}")
        log.event("restart", count=restarts, step=step)
    if mesh.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(given))
        log.message(f"ops backend {ops.name}, device {device}, dtype {dtype}, world {mesh.world} (dp {mesh.dp}, pp {mesh.pp}, tp {mesh.tp})")
    run_config_text = to_toml(given)
    bad_in_a_row, last_saved = 0, None

    def save(at: int) -> Path | None:
        with operation(f"checkpoint save of step {at}"):
            return _save(at)

    def _save(at: int) -> Path | None:
        return save_training(
            SaveRequest(
                root=run_dir, step=at, cfg=loaded.cfg, hf_config=loaded.hf_config, layout=layout, params=loaded.params,
                optimizer=(lambda: _optimizer_state(optimizer, leave_out)) if cfg.checkpoint.save_optim else None,
                zero_sharded=isinstance(optimizer, ZeroAdamW), save_rng=cfg.checkpoint.save_rng,
                data_state={"consumed_samples": consumed, "seed": cfg.data.seed}, run_config=run_config_text,
                hf_files=loaded.hf_files, keep_last=cfg.checkpoint.keep_last,
                adapters=lora.adapters if lora else None, extra_meta=lora.meta() if lora else None,
            ),
            mesh,
        )  # fmt: skip

    last = cfg.train.train_iters if stop_after is None else min(cfg.train.train_iters, step + stop_after)
    val_groups = validation_groups(len(val_source), limit=cfg.eval.iters * cfg.data.global_batch_size, micro_batch=cfg.data.micro_batch_size,
                                   dp_size=mesh.dp, dp_rank=mesh.dp_rank) if cfg.eval.interval and first_stage else []  # fmt: skip
    if step >= last:  # a finished run started again: nothing to train, nothing to overwrite
        log.message(f"the run folder {run_dir} is already at step {step} of {cfg.train.train_iters}: nothing to train")
        log.close()
        return {"run_dir": str(run_dir), "step": step}
    preemption, preempted = Preemption.install(), False
    # Workers load and collate ahead; the position (samples consumed) is all a resume needs.
    batches = None
    if first_stage:
        sampler = StepSampler(n_samples=len(source), global_batch=cfg.data.global_batch_size, micro_batch=cfg.data.micro_batch_size,
                              dp_size=mesh.dp, seed=cfg.data.seed, shuffle=cfg.data.shuffle)  # fmt: skip
        batches = Loader(source, sampler, dp_rank=mesh.dp_rank, num_workers=cfg.data.num_workers, stats=stats,
                         max_tokens=cfg.data.micro_batch_tokens or None).steps(consumed)  # fmt: skip
    stage_times = StageTimes()
    try:
        while step < last:
            started = time.perf_counter()
            micro = None
            if batches is not None:
                with operation("data loading", step=step + 1):
                    fetched = next(batches)
                micro = fetched.micro_batches
                for problem in fetched.problems:  # a corrupt cache entry repaired, an unreadable sample dropped
                    log.message(problem)
            data_seconds = time.perf_counter() - started
            allow_skip = cfg.train.bad_step_policy == "skip" and bad_in_a_row < cfg.train.max_bad_steps - 1
            lr = lr_at(schedule, optimizer.num_steps)
            common = dict(lr=lr, tp=tp_state, mesh=mesh, ops=ops, loss_reduction=cfg.train.loss_reduction, clip_grad=cfg.train.clip_grad,
                          recompute=recompute, allow_skip=allow_skip)  # fmt: skip
            with operation("forward and backward (TP collectives)", step=step + 1):
                if pipe is None:
                    result = train_step(model_params, grads, optimizer, loaded.cfg, micro, **common)
                else:
                    result = pipeline_train_step(model_params, grads, optimizer, loaded.cfg, micro, pipe=pipe, **common)
            if pipe is not None:
                stage_times.add(result.pipeline, time.perf_counter() - started, warmup=step < cfg.log.warmup_steps)
            step += 1
            consumed += cfg.data.global_batch_size
            bad_in_a_row = 0 if result.applied else bad_in_a_row + 1
            log.step(StepRecord(step=step, loss=result.loss, lr=lr, grad_norm=result.grad_norm,
                                tokens=result.tokens, samples=result.samples, modality_tokens=result.modality_tokens,
                                step_seconds=time.perf_counter() - started, data_seconds=data_seconds, devices=mesh.world,
                                skipped=not result.applied, flops=result.flops * mesh.dp, data_stats=_stat_counts(stats),
                                peak_flops_per_device=cfg.log.peak_tflops * 1e12))  # fmt: skip
            if cfg.eval.interval and (step % cfg.eval.interval == 0 or step == cfg.train.train_iters):
                with operation("validation"):
                    scored = validate(lora.view(loaded.params, train=False) if lora else loaded.params, loaded.cfg, val_source, val_groups, step=step, mesh=mesh, ops=ops,
                                      comm=tp_state.comm if tp_state else LOCAL, stats=stats, pipe=pipe)  # fmt: skip
                for problem in scored.problems:
                    log.message(problem)
                log.validation(scored.as_event())
            with operation("preemption check (all-reduce)"):
                stop = preemption.agreed(mesh.world, device)
            if stop:  # SIGTERM on any rank: all stop here; the save below is this step's
                preempted = True
                log.message(f"preempted (SIGTERM) after step {step}: saving it and exiting")
                log.event("preempted", step=step)
                break
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0 and step < last:
                last_saved = save(step)
        last_saved = save(step)
    except BadStep as err:
        log.message(f"stopped at step {step + 1}: {err}; the newest checkpoint is untouched")
        log.event("stop", step=step + 1, reason=str(err))
        log.close()
        raise
    finally:
        if batches is not None:
            batches.close()  # stops the loader's worker processes
        preemption.close()
    if pipe is not None:
        log_stage_times(stage_times, mesh, log, pipe.schedule)
    summary = log.summary()
    if lora is not None and not preempted:  # PEFT folder and / or the base with the adapters merged
        lora.export(cfg, base, loaded, mesh, log)
    if mesh.is_main and cfg.checkpoint.export_hf and not preempted and lora is None:
        if loaded.hf_dir is None:
            raise ConfigError("checkpoint.export_hf needs the original HF folder: set checkpoint.hf_dir")
        out = native_to_hf(last_saved, loaded.hf_dir, _path(base, cfg.checkpoint.export_hf), overwrite=True)
        log.message(f"exported the final model to {out}")
    log.close()
    return summary | {"run_dir": str(run_dir), "step": step, "preempted": preempted}


def _stat_counts(stats: DataStats) -> dict[str, int]:
    return {k: v for k, v in stats.counts.items() if k.startswith("dropped") or "truncated" in k}


def run_from_file(path: str, overrides: Sequence[str], *, dry_run: bool = False) -> int:
    try:
        cfg = load_run_config(path, overrides)
        run(cfg, base=Path(path).resolve().parent, dry_run=dry_run)
        close_distributed()
    except RUN_ERRORS as err:
        print(f"omnicore: error: {err}", file=sys.stderr)
        return 2
    except BadStep as err:
        print(f"omnicore: training stopped: {err}", file=sys.stderr)
        return 3
    return 0
