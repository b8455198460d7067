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
`LOCAL` is the single-process identity, so the pure core runs with no setup; `omnicore_dist` passes
an implementation bound to explicit process groups.
"""

from __future__ import annotations

from typing import Protocol

import attrs
import torch
import torch.nn.functional as F

__all__ = ["Comm", "LocalComm", "LOCAL", "row_linear"]


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


LOCAL = LocalComm()


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, comm: Comm) -> torch.Tensor:
    """Row-parallel linear: partial products reduced across TP ranks, the bias added once, after."""
    if comm.tp_size == 1:
        return F.linear(x, weight, bias)
    y = comm.exit_tp(F.linear(x, weight))
    return y if bias is None else y + bias
