"""Hetero parallel (DESIGN.md section 5): vision / audio encoders with a smaller TP than the LLM.

With LLM TP size T and an encoder TP size E dividing T, each LLM TP group holds T / E encoder
replicas of E adjacent ranks (`omnicore_dist.mesh.build_encoder_groups`). Every rank of the group
sees the same micro-batch; replica j encodes only the media of its share of the samples
(`omnicore.models.encoder_shares`: contiguous runs of ceil(n / (T / E)) samples), with its own E-way TP,
and the replicas' features are all-gathered in sample order before the merge into the token
embeddings. The feature sizes come from the micro-batch itself, which every rank holds, so a
replica with no media gathers zero rows and nothing waits. The gather's backward keeps this
replica's rows: the gradient of the merged embeddings is whole and equal on every TP rank.
Replicated encoder weights thus get partial gradients, summed over the encoder's data-parallel
group once per step (`sum_encoder_replicas`); the grad norm counts each piece once (tp.grad_roles).
Checkpoints store an encoder once per encoder TP rank (written by replica 0), and load under any
layout through the same shard / unshard functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import attrs
import torch
import torch.distributed as dist

from omnicore.comm import LOCAL
from omnicore.config import ThinkerConfig
from omnicore.layout import Layout, rule_for, shard_tensor, tower_of, unshard_tensors
from omnicore.models.thinker import tp_plans
from omnicore_dist.comm import TPComm
from omnicore_dist.config import ConfigError
from omnicore_dist.mesh import Mesh, build_encoder_groups
from omnicore_dist.tp import GradRole

__all__ = ["EncoderReplicas", "tower_tp_sizes", "left_to_first_replica", "own_state", "check_hetero", "run_layout", "hetero_encoders", "sum_encoder_replicas",
           "reshard_state", "saved_sizes", "describe"]  # fmt: skip

_BUCKET_ELEMENTS = 8 * 2**20  # 32 MiB of fp32 per all-reduce
_KEYS = {"vision": "parallel.vit_tp", "audio": "parallel.audio_tp"}
_PP_KEYS = {"vision": "parallel.vit_pp_layers", "audio": "parallel.audio_pp_layers"}


class _GatherShares(torch.autograd.Function):
    """Forward: every replica's feature rows (`rows` per replica, known on every rank), padded to
    the largest share for one all-gather, joined in replica order. Backward: this replica's rows."""

    @staticmethod
    def forward(ctx, x, group, rank, rows):
        if x.shape[0] != rows[rank]:
            raise ValueError(f"encoder replica {rank} has {x.shape[0]} feature rows, its share needs {rows[rank]}")
        ctx.start, ctx.rows = sum(rows[:rank]), rows[rank]
        most = max(rows)
        padded = x.new_zeros(most, x.shape[1])
        padded[: x.shape[0]] = x
        out = x.new_empty(most * len(rows), x.shape[1])
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[j * most : j * most + n] for j, n in enumerate(rows)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start : ctx.start + ctx.rows].contiguous(), None, None, None


@attrs.frozen
class EncoderReplicas:
    """`omnicore.comm.EncoderComm` of a hetero encoder: its own TP seams (`comm`), replica `dp_rank`
    of `dp_size`, and the data-parallel `group` of ranks holding the same encoder piece."""

    comm: object
    dp_size: int
    dp_rank: int
    group: object

    def gather_features(self, x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        return _GatherShares.apply(x, self.group, self.dp_rank, tuple(int(n) for n in rows))


def tower_tp_sizes(parallel) -> dict[str, int]:
    """TP size per tower; an unset encoder size is the LLM's (the recipe's default)."""
    return {"text": parallel.tp, "vision": parallel.vit_tp or parallel.tp, "audio": parallel.audio_tp or parallel.tp}


def check_hetero(parallel, micro_batch_size: int | None) -> dict[str, int]:
    """Validate the per-tower TP sizes before any work (ConfigError naming the keys and the rule);
    returns them (tower -> size). `micro_batch_size` None: micro-batches cut by a token budget, whose
    sample count varies (omnicore.models.encoder_shares' ceil rule applies, no divisibility check)."""
    if getattr(parallel, "cp", 1) != 1:
        raise ConfigError(f"parallel.cp = {parallel.cp}: context parallelism is not built; it must be 1")
    sizes = tower_tp_sizes(parallel)
    tp = parallel.tp
    for tower in ("vision", "audio"):
        key, size = _KEYS[tower], sizes[tower]
        if size < 1 or size > tp or tp % size:
            raise ConfigError(f"{key} = {size} with parallel.tp = {tp}: an encoder's tensor-parallel size must divide the LLM's "
                              f"(equal to it, or smaller for hetero parallel)")  # fmt: skip
        replicas = tp // size
        if replicas == 1:
            continue
        if micro_batch_size is not None and micro_batch_size % replicas:
            raise ConfigError(
                f"data.micro_batch_size {micro_batch_size} is not divisible by the {tower} encoder's data-parallel size {replicas} "
                f"(parallel.tp {tp} / {key} {size}): each of the {replicas} encoder replicas encodes the media of "
                f"micro_batch_size / {replicas} samples"
            )
        counts = getattr(parallel, _PP_KEYS[tower].split(".")[1])
        if counts is not None and sum(1 for n in counts if n) > 1:
            raise ConfigError(f"{_PP_KEYS[tower]} {list(counts)} spreads the {tower} encoder over several pipeline stages; with {key} = "
                              f"{size} below parallel.tp = {tp} (hetero parallel) it must sit on one stage: encoder pipeline "
                              f"parallelism is not built")  # fmt: skip
    return sizes


def run_layout(sizes: Mapping[str, int], parallel=None) -> Layout:
    """The checkpoint layout of a run: its TP sizes and (from `parallel`) its pipeline layer lists."""
    pp = {k: getattr(parallel, k) for k in ("llm_pp_layers", "vit_pp_layers", "audio_pp_layers")} if parallel is not None else {}
    return Layout(tp=sizes["text"], vit_tp=sizes["vision"], audio_tp=sizes["audio"], **pp)


def hetero_encoders(mesh: Mesh, sizes: Mapping[str, int]) -> dict[str, EncoderReplicas]:
    """Collectively: the replicas of every encoder whose TP size is below the LLM's (the TPComm's
    `encoders`); towers at the LLM's size are left out (they run on the whole batch)."""
    out, groups = {}, {}
    for tower in ("vision", "audio"):
        size = sizes[tower]
        if size == mesh.tp:
            continue
        if size not in groups:  # towers of the same size share their groups
            groups[size] = build_encoder_groups(mesh, size)
        g = groups[size]
        comm = TPComm(g.tp_group, g.tp_rank, g.size) if g.size > 1 else LOCAL
        out[tower] = EncoderReplicas(comm=comm, dp_size=g.replicas, dp_rank=g.replica, group=g.dp_group)
    return out


def sum_encoder_replicas(flat: torch.Tensor, views: Mapping[str, torch.Tensor], roles: Mapping[str, GradRole],
                         encoders: Mapping[str, EncoderReplicas]) -> None:  # fmt: skip
    """In place: the partial gradients of hetero encoder pieces become their sum over the replicas.
    `views` are slices of the flat buffer `flat`; adjacent ones are all-reduced as one run."""
    for tower, replicas in encoders.items():
        names = [n for n in views if tower_of(n) == tower and roles[n].replicas > 1]
        for start, stop in _runs([views[n] for n in names], flat):
            for lo in range(start, stop, _BUCKET_ELEMENTS):
                dist.all_reduce(flat[lo : min(stop, lo + _BUCKET_ELEMENTS)], group=replicas.group)


def _runs(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> list[tuple[int, int]]:
    """Element ranges of `flat` covered by `tensors` (views of it), adjacent ones merged."""
    spans = sorted((t.storage_offset() - flat.storage_offset(), t.numel()) for t in tensors if t.numel())
    runs: list[list[int]] = []
    for offset, n in spans:
        if runs and runs[-1][1] == offset:
            runs[-1][1] += n
        else:
            runs.append([offset, offset + n])
    return [(a, b) for a, b in runs]


def reshard_state(cfg: ThinkerConfig, plain: Sequence[Mapping[str, torch.Tensor]], saved: Mapping[str, int],
                  sizes: Mapping[str, int], rank: int, rule: Callable[[str], object] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """This rank's optimizer state from the saved TP ranks' plain states (`plain[t]`, saved tower
    sizes `saved`): a tower saved at size S is joined from ranks 0..S-1 (replica 0's pieces) and cut
    again for this run's size (rank % size); entries are "<moment>.<parameter name>" plus "step".
    `rule` gives a name's Split (default: the model's TP plan; LoRA passes its adapters' rule)."""
    if dict(saved) == dict(sizes) and len(plain) == sizes["text"]:
        return own_state(plain, rank, sizes)
    plans = tp_plans(cfg)
    rule = rule or (lambda name: rule_for(name, plans[tower_of(name)]))
    state = {}
    for key, first in plain[0].items():
        if key == "step":
            state[key] = first
            continue
        name = key.split(".", 1)[1]
        tower, split = tower_of(name), rule(name)
        full = unshard_tensors([p[key] for p in plain[: saved[tower]]], split, name)
        state[key] = shard_tensor(full, split, rank % sizes[tower], sizes[tower], name).contiguous()
    return state


def left_to_first_replica(rank: int, sizes: Mapping[str, int]) -> Callable[[str], bool]:
    """Whether TP rank `rank` leaves parameter `name`'s optimizer entries out of its save: a hetero
    encoder's replicas (ranks at or past its size E) hold the moments of rank `rank % E`, which saves them."""
    return lambda name: rank >= sizes[tower_of(name)]


def own_state(plain: Mapping[int, Mapping[str, torch.Tensor]] | Sequence[Mapping[str, torch.Tensor]], rank: int,
              sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:  # fmt: skip
    """TP rank `rank`'s optimizer state under the tower sizes it was saved with (`plain[t]`: saved TP
    rank t's plain state): each tower's entries from rank `rank % E`, the first replica of its piece."""
    state = {"step": plain[rank]["step"]}
    for tower, size in sizes.items():
        state |= {k: v for k, v in plain[rank % size].items() if k != "step" and tower_of(k.split(".", 1)[1]) == tower}
    return state


def describe(sizes: Mapping[str, int]) -> str:
    """One plan line's words for the encoders' layout."""
    parts = []
    for tower in ("vision", "audio"):
        replicas = sizes["text"] // sizes[tower]
        parts.append(f"{tower} tp {sizes[tower]}" + (f" x {replicas} data-parallel replicas" if replicas > 1 else ""))
    return "encoders: " + ", ".join(parts)


def saved_sizes(meta: Mapping) -> dict[str, int]:
    """Tower TP sizes recorded in a checkpoint's meta.json (layout.tp)."""
    tp = meta.get("layout", {}).get("tp")
    if not tp:
        size = int(meta.get("tp_size", 1))
        return {"text": size, "vision": size, "audio": size}
    return {tower: int(tp[tower]) for tower in ("text", "vision", "audio")}
