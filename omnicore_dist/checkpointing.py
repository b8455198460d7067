"""Training checkpoints in the native format: weights + optimizer + RNG + data position, every rank.

One step folder per save (`iter_0000100/`), committed with the converter's protocol: the main rank
opens the temporary folder, every rank writes its own files into it (RNG per data-parallel rank,
ZeRO optimizer shards per rank), the main rank gathers their checksums, writes `meta.json` last,
renames the folder into place and only then moves the tracker. `meta.json` records what the
checkpoint lacks (optimizer or RNG when saving them was switched off), and a resume from it says
that it is inexact. `keep_last` rotation only ever deletes complete, older checkpoints.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import attrs
import torch
import torch.distributed as dist

from omnicore.checkpoint.commit import META, StepWriter, read_tracker, step_dirname
from omnicore.checkpoint.lora_io import adapter_file
from omnicore.checkpoint.native import NativeCheckpoint, native_meta, write_rank_files
from omnicore.checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter
from omnicore.config import ThinkerConfig
from omnicore.layout import Layout, stage_of
from omnicore.models.thinker import tower_depths
from omnicore_dist.hetero import saved_sizes
from omnicore_dist.mesh import Mesh, gather_lists

__all__ = ["SaveRequest", "save_training", "Resume", "load_resume", "rng_state", "set_rng_state", "rotate"]


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> tuple[str, str, int]:
    with SafetensorsWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return path.name, w.sha256, w.nbytes


@attrs.frozen(kw_only=True)
class SaveRequest:
    root: Path
    step: int
    cfg: ThinkerConfig
    hf_config: Mapping
    layout: Layout
    params: Mapping[str, torch.Tensor]  # this TP rank's pieces of the weights, in the layout's sharding
    optimizer: Callable[[], Mapping[str, torch.Tensor]] | None  # None: --no-save-optim
    zero_sharded: bool  # optimizer state differs per DP rank (ZeRO-1): every rank writes its own
    save_rng: bool
    data_state: Mapping
    run_config: str  # the resolved run config (TOML)
    hf_files: Mapping[str, Path]
    keep_last: int = 0
    adapters: Mapping[str, torch.Tensor] | None = None  # LoRA: this rank's adapter pieces, saved instead of the model
    extra_meta: Mapping | None = None  # more meta.json entries (LoRA: spec and base)


def save_training(req: SaveRequest, mesh: Mesh) -> Path | None:
    """Collective: every rank calls it. Returns the committed step folder on the main rank."""
    step = StepWriter(req.root, iteration=req.step, overwrite=True) if mesh.is_main else None
    _barrier(mesh)
    tmp = req.root / f".tmp-{step_dirname(req.step)}"
    mine: list[tuple[str, str, int]] = []
    if req.save_rng:
        mine.append(_write_tensors(tmp / _rank_file("rng", mesh.tp_rank, mesh.pp_rank, mesh.dp_rank), rng_state()))
    if req.optimizer is not None and (req.zero_sharded or mesh.dp_rank == 0):
        name = _rank_file("optim", mesh.tp_rank, mesh.pp_rank, mesh.dp_rank if req.zero_sharded else None)
        mine.append(_write_tensors(tmp / name, req.optimizer()))
    if mesh.dp_rank == 0 and req.adapters is not None:  # LoRA: the adapters only, never the frozen base
        mine.append(_write_tensors(tmp / adapter_file(mesh.tp_rank, mesh.pp_rank), {k: v.detach() for k, v in req.adapters.items()}))
    elif mesh.dp_rank == 0:  # each TP rank writes its stage's pieces of the model; DP replicas write nothing
        mine += write_rank_files(tmp, req.cfg, req.layout, req.params, mesh.tp_rank, mesh.pp_rank)
    records = gather_lists(mine, mesh)
    out = None
    if mesh.is_main:
        step.write_text("data.json", json.dumps(dict(req.data_state), indent=2))
        step.write_text("run_config.toml", req.run_config)
        for name, path in req.hf_files.items():
            step.copy_in(path, f"hf/{name}")
        for name, sha, nbytes in records:
            step.add(name, sha, nbytes)
        lacks = [what for what, kept in (("optimizer", req.optimizer is not None), ("rng", req.save_rng)) if not kept]
        meta = native_meta(req.cfg, req.hf_config, req.layout, {
            "kind": "training",
            "lacks": lacks,
            "dp_size": mesh.dp,
            "tp_size": mesh.tp,
            "pp_size": mesh.pp,
            "zero_sharded": req.zero_sharded,
            **(req.extra_meta or {}),
        })  # fmt: skip
        out = step.commit(meta)
        rotate(req.root, req.keep_last)
    _barrier(mesh)
    return out


def _rank_file(kind: str, tp_rank: int, pp_rank: int, dp_rank: int | None) -> str:
    return f"{kind}-tp{tp_rank:02d}-pp{pp_rank:02d}" + (f"-dp{dp_rank:02d}" if dp_rank is not None else "") + ".safetensors"


def _barrier(mesh: Mesh) -> None:
    if mesh.world > 1:
        dist.barrier()


def rotate(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints older than the newest `keep_last` (never the tracked one)."""
    if keep_last <= 0:
        return
    tracked = read_tracker(root)
    steps = sorted(p for p in root.glob("iter_*") if (p / META).exists())
    for old in steps[:-keep_last]:
        if tracked is None or old.name != step_dirname(int(tracked)):
            shutil.rmtree(old)


@attrs.frozen(kw_only=True)
class Resume:
    """What a training checkpoint restores beyond the weights."""

    step: int
    data_state: Mapping
    optimizer: Mapping[int, Sequence[Sequence[Mapping[str, torch.Tensor]]]] | None  # {tp rank: [pp stage][ZeRO dp shard] states}
    rng: Mapping[str, torch.Tensor] | None
    inexact: tuple[str, ...]  # what is missing, for the warning
    # `optimizer` is only this rank's stage and the TP ranks holding its pieces' state (the layout is
    # unchanged): its own and, for a hetero encoder's replica, the first replica's
    own_optimizer: bool = False


def load_resume(ckpt: NativeCheckpoint, mesh: Mesh, *, load_optim: bool, load_rng: bool, names: Collection[str] | None = None,
                same_layout: bool = False, draws_random: bool = True) -> Resume | None:  # fmt: skip
    """Optimizer / RNG / data position of a training checkpoint (None for a release). `names`: the
    parameters this rank trains; only the saved pipeline stages holding them are read. `same_layout`:
    the checkpoint was saved under this run's TP sizes and pipeline stages, so this rank reads only
    its own TP rank's and stage's optimizer files (with ZeRO, all their DP shards, re-sliced for any
    DP size), and a hetero encoder replica also its first replica's, not every TP rank's to re-cut them.
    `draws_random`: whether the run's steps draw random numbers (LoRA dropout); when they do not, a
    rank the saved layout did not have (so no RNG file) loses nothing and the resume stays exact."""
    meta = ckpt.meta
    if meta.get("kind") != "training":
        return None
    inexact = list(meta.get("lacks", []))
    optimizer = None
    if "optimizer" not in inexact and load_optim:
        tp, pp, dp, zero = int(meta.get("tp_size", 1)), int(meta.get("pp_size", 1)), int(meta["dp_size"]), bool(meta.get("zero_sharded"))
        needed = list(range(pp)) if names is None or pp == 1 else _stages_holding(meta, names)
        own = same_layout and needed in ([], [mesh.pp_rank])  # under the saved layout a stage's states are its own
        tp_ranks = sorted({mesh.tp_rank % size for size in saved_sizes(meta).values()}) if own else list(range(tp))
        files = {t: [[_rank_file("optim", t, s, d if zero else None) for d in (range(dp) if zero else [None])] for s in needed] for t in tp_ranks}
        ckpt.verified(*(name for stages in files.values() for shards in stages for name in shards))  # in parallel, once
        optimizer = {t: [[_read_all(ckpt.path / name) for name in shards] for shards in stages] for t, stages in files.items()}
        if not needed:  # a stage with nothing to train: only the update count (the LR schedule's position)
            count = SafetensorsFile(ckpt.verified(_rank_file("optim", 0, 0, 0 if zero else None))[0]).read("step")
            optimizer = {t: [[{"step": count}]] for t in tp_ranks}
    elif not load_optim:
        inexact.append("optimizer (load_optim = false)")
    rng = None
    rng_file = _rank_file("rng", mesh.tp_rank, mesh.pp_rank, mesh.dp_rank)
    if "rng" not in inexact and load_rng and ckpt.lists(rng_file):
        rng = _read_all(ckpt.verified(rng_file)[0])
    elif load_rng and "rng" not in inexact and draws_random:
        inexact.append(f"rng (no state for tensor / pipeline / data-parallel rank {mesh.tp_rank} / {mesh.pp_rank} / {mesh.dp_rank})")
    data_state = json.loads(ckpt.verified("data.json")[0].read_text()) if ckpt.lists("data.json") else {}
    return Resume(step=int(meta["iteration"]), data_state=data_state, optimizer=optimizer, rng=rng, inexact=tuple(inexact),
                  own_optimizer=optimizer is not None and own)  # fmt: skip


def _stages_holding(meta: Mapping, names: Collection[str]) -> list[int]:
    """The stages of the saved pipeline layout that hold any of `names` (parameters or adapters)."""
    stages = Layout.from_json(meta["layout"]).stages(tower_depths(ThinkerConfig.from_hf(meta["hf_config"])))
    return sorted({stage_of(n, stages) for n in names})


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(path)
    return {k: f.read(k) for k in f.keys()}
