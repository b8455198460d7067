"""The communication protocol model functions call at tensor-parallel seams.

Megatron's f / g pair: `enter_tp` marks the input of a column-parallel region (identity forward,
all-reduce of the gradient backward) and `exit_tp` the output of a row-parallel region (all-reduce
forward, identity backward). The vocabulary is split too: `vocab_cross_entropy` takes this rank's
slice of the logits (K, V / tp) and returns the per-target loss (K,) without ever forming the full
logits; `gather_vocab` joins the slices when full logits are wanted (inspection, decoding).
Sequence parallelism (`sequence_parallel`): inside the decoder layers activations are split along
tokens; `enter_tp` then all-gathers tokens and `exit_tp` reduce-scatters them, `scatter_tokens` /
`gather_tokens` enter and leave the split region, and `replicated()` is the Comm for everything
outside it (encoders, embedding, head), where activations are whole on every rank.
`encoder(tower)` says how an encoder runs inside the LLM's TP group (DESIGN.md section 5, hetero
parallel): with its own, smaller TP `comm` on `dp_size` data-parallel replicas, each encoding the
media of its share of the micro-batch's samples, `gather_features` joining the replicas' features
in sample order. Without hetero parallelism (and in `LOCAL`) it is one replica on the whole batch.
`LOCAL` is the single-process identity, so the pure core runs with no setup; `omnicore_dist` passes
an implementation bound to explicit process groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs
import torch
import torch.nn.functional as F

__all__ = ["Comm", "EncoderComm", "WholeBatch", "LocalComm", "LOCAL", "row_linear"]


class Comm(Protocol):
    tp_size: int
    tp_rank: int
    sequence_parallel: bool

    def enter_tp(self, x: torch.Tensor) -> torch.Tensor: ...

    def exit_tp(self, y: torch.Tensor) -> torch.Tensor: ...

    def vocab_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor: ...

    def scatter_tokens(self, x: torch.Tensor) -> torch.Tensor: ...

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor: ...

    def replicated(self) -> Comm: ...

    def encoder(self, tower: str) -> EncoderComm: ...


class EncoderComm(Protocol):
    """How one encoder tower ("vision" / "audio") runs: its own TP seams, and its data-parallel
    replicas inside the LLM's TP group (replica `dp_rank` of `dp_size`)."""

    comm: Comm
    dp_size: int
    dp_rank: int

    def gather_features(self, x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """This replica's features (rows[dp_rank], C) -> every replica's, in replica order (sum rows, C);
        the gradient flows back to each replica's own rows."""
        ...


@attrs.frozen
class WholeBatch:
    """One replica encodes the whole micro-batch with `comm` (no encoder data parallelism)."""

    comm: Comm
    dp_size: int = 1
    dp_rank: int = 0

    def gather_features(self, x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        return x


@attrs.frozen
class LocalComm:
    """No tensor parallelism: every seam is the identity."""

    tp_size: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False

    def enter_tp(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def exit_tp(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def vocab_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-target cross-entropy (K,) in fp32 (HF upcasts the logits the same way)."""
        return F.cross_entropy(logits.float(), targets, reduction="none")

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def scatter_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def replicated(self) -> LocalComm:
        return self

    def encoder(self, tower: str) -> WholeBatch:
        return WholeBatch(self)


LOCAL = LocalComm()


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, comm: Comm) -> torch.Tensor:
    """Row-parallel linear: partial products reduced across TP ranks, the bias added once, after."""
    if comm.tp_size == 1:
        return F.linear(x, weight, bias)
    y = comm.exit_tp(F.linear(x, weight))
    return y if bias is None else y + bias
