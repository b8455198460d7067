"""Tensor-parallel communication over an explicit process group: the `omnicore.comm.Comm` protocol.

Megatron's pair of conjugate functions, as autograd Functions:
    enter_tp (f): forward identity, backward all-reduce of the gradient;
    exit_tp  (g): forward all-reduce, backward identity.
With sequence parallelism (the decoder layers only) the pair becomes an all-gather of tokens whose
backward is a reduce-scatter, and a reduce-scatter whose backward is an all-gather; the same bytes
as the all-reduces it replaces, while norms and residuals run on 1 / tp of the tokens.
`vocab_cross_entropy` is Megatron's vocab-parallel loss: each rank holds a vocab slice of the
logits; the max, the sum of exponentials and the target logit are all-reduced (three (K,) vectors
instead of (K, V) logits), and the backward (softmax - one-hot) stays local.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch
import torch.distributed as dist

from omnicore.comm import EncoderComm, WholeBatch

__all__ = ["TPComm"]


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Exit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        y = y.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _gather_rows(x, group, size):
    out = torch.empty((x.shape[0] * size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_rows(x, group, size):
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _GatherTokens(torch.autograd.Function):
    """Forward: all-gather rows; backward: reduce-scatter (the layers after it are tensor parallel)."""

    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _gather_rows(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.group, ctx.size), None, None


class _ReduceScatterTokens(torch.autograd.Function):
    """Forward: reduce-scatter rows (a row-parallel output); backward: all-gather."""

    @staticmethod
    def forward(ctx, y, group, size):
        ctx.group, ctx.size = group, size
        return _reduce_scatter_rows(y, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.group, ctx.size), None, None


class _Split(torch.autograd.Function):
    """Forward: keep this rank's rows of a replicated tensor; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.group, ctx.size = group, size
        rows = x.shape[0] // size
        return x[rank * rows : (rank + 1) * rows].clone()

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.group, ctx.size), None, None, None


class _Join(torch.autograd.Function):
    """Forward: all-gather rows into a replicated tensor; backward: keep this rank's rows (every
    rank computes the same gradient downstream, so no reduction is due)."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.rank, ctx.rows = rank, x.shape[0]
        return _gather_rows(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows].contiguous(), None, None, None


class _VocabCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, rank):
        logits = logits.float()
        v_local = logits.shape[-1]
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - top[:, None]
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)
        local = targets - rank * v_local
        mine = (local >= 0) & (local < v_local)
        rows = torch.arange(len(targets), device=logits.device)
        target_logit = torch.where(mine, shifted[rows, local.clamp(0, v_local - 1)], 0.0)
        dist.all_reduce(target_logit, group=group)
        ctx.save_for_backward(exp.div_(total[:, None]), local, mine)
        return total.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine = ctx.saved_tensors
        rows = torch.arange(len(local), device=softmax.device)[mine]
        softmax[rows, local[mine]] -= 1.0  # d loss / d logit = softmax - one_hot (the one-hot lives on one rank)
        return softmax * grad[:, None], None, None, None


@attrs.frozen
class TPComm:
    """The Comm of one tensor-parallel group (`group` None is not allowed: use omnicore.comm.LOCAL)."""

    group: object
    tp_rank: int
    tp_size: int
    sequence_parallel: bool = False
    encoders: Mapping[str, EncoderComm] = attrs.field(factory=dict)  # hetero parallel: tower -> its replicas (omnicore_dist.hetero)

    def enter_tp(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return _GatherTokens.apply(x, self.group, self.tp_size)
        return _Enter.apply(x, self.group)

    def exit_tp(self, y: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return _ReduceScatterTokens.apply(y, self.group, self.tp_size)
        return _Exit.apply(y, self.group)

    def scatter_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Rows -> this rank's 1 / tp of them (the token count must divide by tp)."""
        return _Split.apply(x, self.group, self.tp_rank, self.tp_size) if self.sequence_parallel else x

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return _Join.apply(x, self.group, self.tp_rank, self.tp_size) if self.sequence_parallel else x

    def replicated(self) -> TPComm:
        """The Comm for regions whose activations are whole on every rank."""
        return attrs.evolve(self, sequence_parallel=False) if self.sequence_parallel else self

    def encoder(self, tower: str) -> EncoderComm:
        """The tower's hetero replicas, or the whole batch on this TP group (activations whole)."""
        return self.encoders.get(tower) or WholeBatch(self.replicated())

    def vocab_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _VocabCrossEntropy.apply(logits, targets, self.group, self.tp_rank)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Full logits (no gradient: for inspection and decoding, never for the training loss)."""
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits.detach().contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
