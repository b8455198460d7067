"""Tensor parallelism in the runtime: shard the model for this rank, and keep gradients right.

With Megatron's f / g pair every rank already gets the full gradient of a replicated parameter
(norms, row-parallel biases, the convs) and its own slice's gradient of a split one. One case needs
communication: GQA k / v heads replicated because the TP size exceeds them (`replicate_short`);
each copy sees only its ranks' query heads, so the copies' gradients are summed. For the global
norm every parameter must count once: split slices are summed over the group, replicated tensors
weighted by 1 / (number of copies). With sequence parallelism the decoder layers' norms see only
this rank's tokens, so their gradients are partial sums, added up over the group.
Hetero parallel (`tower_tp`: an encoder's TP size E below the group's T): rank t holds encoder piece
t % E, the T / E replicas of each piece see only their share of the media, so their gradients are
partial sums over the encoder's data-parallel group (`replicas`), and a piece counts T / E times more
copies in the norm.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs
import torch
import torch.distributed as dist

from omnicore.config import ThinkerConfig
from omnicore.checkpoint.pieces import RankPieces
from omnicore.layout import TOWERS, Split, rule_for, tower_of, unshard_tensors
from omnicore.models.thinker import tp_plans

__all__ = ["GradRole", "split_role", "tower_sizes", "grad_roles", "shard_for_rank", "sum_replicated_kv", "sum_partial", "norm_weights", "gather_full"]


@attrs.frozen
class GradRole:
    """How a local gradient relates across the TP group: `copies` ranks hold the same tensor;
    `blocks` > 0 means kv-head copies (rank r holds block r // copies of `blocks`)."""

    copies: int
    blocks: int = 0
    partial: bool = False  # sequence parallel: every rank holds a part of the sum
    replicas: int = 1  # hetero encoder: replicas of this piece whose partial gradients are summed


def split_role(split: Split | None, size: int) -> GradRole:
    """The gradient role of a tensor cut by `split` over `size` ranks (None: replicated)."""
    if split is None:
        return GradRole(copies=size)
    if split.replicate_short and split.units and size > split.units:
        return GradRole(copies=size // split.units, blocks=split.units)
    return GradRole(copies=1)


_SP_PARTIAL = re.compile(r"text\.layers\.\d+\.(attn|mlp)_norm\.weight")


def tower_sizes(size: int, tower_tp: Mapping[str, int] | None) -> dict[str, int]:
    """Each tower's TP size: `tower_tp`'s (hetero parallel) or the group's `size`."""
    return {tower: (tower_tp or {}).get(tower) or size for tower in TOWERS}


def grad_roles(cfg: ThinkerConfig, names, size: int, *, sequence_parallel: bool = False,
               tower_tp: Mapping[str, int] | None = None) -> dict[str, GradRole]:  # fmt: skip
    plans = tp_plans(cfg)
    sizes = tower_sizes(size, tower_tp)
    roles = {}
    for n in names:
        tower_size = sizes[tower_of(n)]
        role = split_role(rule_for(n, plans[tower_of(n)]), tower_size)
        if tower_size < size:  # hetero encoder: size / tower_size replicas of every piece
            role = attrs.evolve(role, copies=role.copies * (size // tower_size), replicas=size // tower_size)
        roles[n] = role
    if sequence_parallel:
        roles |= {n: attrs.evolve(roles[n], partial=True) for n in names if _SP_PARTIAL.fullmatch(n)}
    return roles


def sum_partial(grads: Mapping[str, torch.Tensor], roles: Mapping[str, GradRole], *, group) -> None:
    """In place: sequence-parallel partial gradients become their sum over the TP group."""
    for name, role in roles.items():
        if role.partial and name in grads:
            dist.all_reduce(grads[name], group=group)


def shard_for_rank(cfg: ThinkerConfig, params: Mapping[str, torch.Tensor], rank: int, size: int,
                   tower_tp: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """This rank's pieces of full parameters (contiguous copies, so the full tensors can be freed);
    a tower with a smaller TP size E (`tower_tp`) gets piece rank % E."""
    pieces = RankPieces.of_model(cfg, rank, tower_sizes(size, tower_tp))
    return {k: pieces.cut(v, k) for k, v in params.items()}


def sum_replicated_kv(grads: Mapping[str, torch.Tensor], roles: Mapping[str, GradRole], *, rank: int, group) -> None:
    """In place: each kv-head copy's gradient becomes the sum over the ranks holding that head."""
    for name, role in roles.items():
        if not role.blocks or name not in grads:
            continue
        g = grads[name]
        slots = torch.zeros(role.blocks, *g.shape, dtype=g.dtype, device=g.device)
        slots[rank // role.copies] = g
        dist.all_reduce(slots, group=group)
        g.copy_(slots[rank // role.copies])


def norm_weights(roles: Mapping[str, GradRole]) -> dict[str, float]:
    """Per tensor weight of its squared norm so the TP-summed total counts every element once."""
    return {n: 1.0 / r.copies for n, r in roles.items()}


def gather_full(cfg: ThinkerConfig, local: Mapping[str, torch.Tensor], *, size: int, group,
                tower_tp: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Full tensors from every TP rank's pieces (collective; for saving and tests)."""
    plans = tp_plans(cfg)
    sizes = tower_sizes(size, tower_tp)
    out = {}
    for name, piece in local.items():
        parts = [torch.empty_like(piece) for _ in range(size)]
        dist.all_gather(parts, piece.detach().contiguous(), group=group)
        out[name] = unshard_tensors(parts[: sizes[tower_of(name)]], rule_for(name, plans[tower_of(name)]), name)
    return out
