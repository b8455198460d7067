"""Tensor-parallel communication over an explicit process group: the `omnicore.comm.Comm` protocol.

Megatron's pair of conjugate functions, as autograd Functions:
    enter_tp (f): forward identity, backward all-reduce of the gradient;
    exit_tp  (g): forward all-reduce, backward identity.
`vocab_cross_entropy` is Megatron's vocab-parallel loss: each rank holds a vocab slice of the
logits; the max, the sum of exponentials and the target logit are all-reduced (three (K,) vectors
instead of (K, V) logits), and the backward (softmax - one-hot) stays local.
"""

from __future__ import annotations

import attrs
import torch
import torch.distributed as dist

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

    def enter_tp(self, x: torch.Tensor) -> torch.Tensor:
        return _Enter.apply(x, self.group)

    def exit_tp(self, y: torch.Tensor) -> torch.Tensor:
        return _Exit.apply(y, self.group)

    def vocab_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _VocabCrossEntropy.apply(logits, targets, self.group, self.tp_rank)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Full logits (no gradient: for inspection and decoding, never for the training loss)."""
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits.detach().contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
