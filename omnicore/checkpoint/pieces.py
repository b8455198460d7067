"""One tensor-parallel rank's pieces of the model, read straight from safetensors files, so a rank
loading a model holds its own pieces and at most one full tensor, never the whole model."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch

from omnicore.checkpoint.safetensors_io import SafetensorsFile
from omnicore.config import ThinkerConfig
from omnicore.layout import Split, TPPlan, piece_span, rule_for, shard_tensor, tower_of
from omnicore.models.thinker import tp_plans

__all__ = ["RankPieces"]


@attrs.frozen
class RankPieces:
    """The pieces TP rank `rank` holds: of a tower at TP size E, piece `rank % E` (a hetero encoder,
    with E below the LLM's size, is replicated over rank // E), cut by the tower's plan."""

    rank: int
    sizes: Mapping[str, int]  # tower -> TP size
    plans: Mapping[str, TPPlan]  # tower -> plan

    @classmethod
    def of_model(cls, cfg: ThinkerConfig, rank: int, sizes: Mapping[str, int]) -> RankPieces:
        return cls(rank, dict(sizes), tp_plans(cfg))

    def where(self, name: str) -> tuple[Split | None, int, int]:
        """(split rule, piece index, TP size) of native tensor `name`."""
        tower = tower_of(name)
        size = self.sizes[tower]
        return rule_for(name, self.plans[tower]), self.rank % size, size

    def cut(self, full: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's piece of the full tensor `name`: a contiguous copy (so `full` can be freed),
        or `full` itself at TP size 1."""
        split, rank, size = self.where(name)
        if size == 1:
            return full
        return shard_tensor(full, split, rank, size, name).clone(memory_format=torch.contiguous_format)

    def read(self, f: SafetensorsFile, key: str, name: str | None = None) -> torch.Tensor:
        """This rank's piece of the full tensor `key` stored in `f` (native name `name`, default
        `key`), equal to `cut(f.read(key))`: a piece along dim 0 reads only its own bytes."""
        name = name or key
        split, rank, size = self.where(name)
        if split is None or size == 1:
            return f.read(key)
        return f.read_span(key, split.dim, *piece_span(split, f.tensors[key].shape[split.dim], rank, size, name))
