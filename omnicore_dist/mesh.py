"""Named (dp, pp, tp) process groups, validated once; the only place that builds groups.

Rank order puts tensor parallelism innermost (ranks of one TP group are adjacent, i.e. on one node),
then data parallelism, then pipeline stages (Megatron's order):
    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank.
A single process gets a Mesh with every size 1 and no process group at all.
Hetero parallel: an encoder with TP size E < tp splits each TP group into tp / E replicas of E
adjacent ranks (encoder TP rank = tp_rank % E, replica = tp_rank // E); `build_encoder_groups`
makes the encoder's TP groups and the groups of ranks holding the same encoder piece.
"""

from __future__ import annotations

import datetime
import os

import attrs
import torch
import torch.distributed as dist

from omnicore_dist.env import accelerator

__all__ = ["Mesh", "build_mesh", "MeshError", "gather_lists", "init_distributed", "close_distributed", "job_store", "local_device",
           "EncoderGroups", "build_encoder_groups"]  # fmt: skip

_JOB_STORE = None  # the rendezvous key-value store of this job (omnicore_dist.watchdog notes progress in it)
_JOB_TIMEOUT: datetime.timedelta | None = None  # parallel.timeout_minutes, for every group (new_group's default is 30 min)


def job_store():
    return _JOB_STORE


class MeshError(ValueError):
    """A world size that cannot hold the requested layout; names both."""


@attrs.frozen
class Mesh:
    world: int
    rank: int
    dp: int
    pp: int
    tp: int
    dp_group: object | None = None  # torch.distributed ProcessGroup, None when the size is 1
    pp_group: object | None = None
    tp_group: object | None = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def gather_lists(items: list, mesh: Mesh) -> list:
    """Collective: every rank's `items`, concatenated in rank order."""
    if mesh.world == 1:
        return items
    everyone: list = [None] * mesh.world
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


def _check(world: int, tp: int, pp: int) -> int:
    if tp < 1 or pp < 1:
        raise MeshError(f"parallel.tp and the pipeline depth must be >= 1 (got tp={tp}, pp={pp})")
    if world % (tp * pp):
        raise MeshError(f"world size {world} is not divisible by tp {tp} x pp {pp} = {tp * pp}")
    return world // (tp * pp)


def local_device() -> torch.device:
    """This process's accelerator (torchrun's LOCAL_RANK picks the chip on its node), made current:
    NCCL and HCCL bind a communicator to the current device, so it must be set before they start."""
    kind = accelerator()
    if kind == "cpu":
        return torch.device("cpu")
    module = getattr(torch, kind)
    device = torch.device(kind, int(os.environ.get("LOCAL_RANK", "0")) % module.device_count())
    module.set_device(device)
    return device


def init_distributed(timeout_minutes: float) -> tuple[int, int]:
    """Join the job torchrun started (env:// rendezvous), or stay single-process. Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        local_device()
        backend = {"npu": "hccl", "cuda": "nccl"}.get(accelerator(), "gloo")
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps one store across --max-restarts: without a per-attempt prefix, a restarted
        # rank can read the address its dead predecessor published and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"omnicore/attempt-{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
        global _JOB_STORE, _JOB_TIMEOUT
        _JOB_STORE, _JOB_TIMEOUT = store, timeout
    return dist.get_rank(), dist.get_world_size()


def close_distributed() -> None:
    """Leave the job cleanly: every rank waits for the others, then the process groups (their
    communication threads) are destroyed here rather than torn down by interpreter exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _new_group(ranks: list[int]):
    """A process group over `ranks` with the job's collective timeout."""
    return dist.new_group(ranks, timeout=_JOB_TIMEOUT) if _JOB_TIMEOUT is not None else dist.new_group(ranks)


def build_mesh(world: int, rank: int, *, tp: int = 1, pp: int = 1) -> Mesh:
    """Validate the layout and create every group (collectively: all ranks must call this)."""
    dp = _check(world, tp, pp)
    if world == 1:
        return Mesh(world=1, rank=0, dp=1, pp=1, tp=1)
    groups: dict[str, object] = {}
    for name, ranks_of in (
        ("tp", [[p * dp * tp + d * tp + t for t in range(tp)] for p in range(pp) for d in range(dp)]),
        ("dp", [[p * dp * tp + d * tp + t for d in range(dp)] for p in range(pp) for t in range(tp)]),
        ("pp", [[p * dp * tp + d * tp + t for p in range(pp)] for d in range(dp) for t in range(tp)]),
    ):
        for ranks in ranks_of:
            group = _new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                groups[name] = group
    return Mesh(world=world, rank=rank, dp=dp, pp=pp, tp=tp, dp_group=groups["dp"], pp_group=groups["pp"], tp_group=groups["tp"])


@attrs.frozen
class EncoderGroups:
    """An encoder's groups inside this rank's TP group: its own TP group (`size` ranks) and its
    data-parallel group (`replicas` ranks with the same encoder TP rank). None where the size is 1."""

    size: int
    replicas: int
    tp_rank: int
    replica: int
    tp_group: object | None = None
    dp_group: object | None = None


def build_encoder_groups(mesh: Mesh, size: int) -> EncoderGroups:
    """Collectively (all ranks, same order): the groups of an encoder with TP `size` dividing mesh.tp."""
    if size < 1 or mesh.tp % size:
        raise MeshError(f"encoder tensor-parallel size {size} does not divide parallel.tp = {mesh.tp}")
    replicas = mesh.tp // size
    mine = EncoderGroups(size=size, replicas=replicas, tp_rank=mesh.tp_rank % size, replica=mesh.tp_rank // size)
    if replicas == 1:  # not hetero: the encoder uses the LLM's TP group
        return attrs.evolve(mine, tp_group=mesh.tp_group)
    groups: dict[str, object] = {"tp": None, "dp": mesh.tp_group if size == 1 else None}
    bases = [p * mesh.dp * mesh.tp + d * mesh.tp for p in range(mesh.pp) for d in range(mesh.dp)]
    for base in bases:
        for name, ranks_of, needed in (
            ("tp", [[base + j * size + e for e in range(size)] for j in range(replicas)], size > 1),
            ("dp", [[base + j * size + e for j in range(replicas)] for e in range(size)], size > 1),
        ):
            if not needed:  # size 1: no encoder TP group; the data-parallel group is the whole TP group
                continue
            for ranks in ranks_of:
                group = _new_group(ranks)
                if mesh.rank in ranks:
                    groups[name] = group
    return attrs.evolve(mine, tp_group=groups["tp"], dp_group=groups["dp"])
