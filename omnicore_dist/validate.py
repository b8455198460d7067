"""Validation loss during training: which held-out samples each rank scores, and the reduced result.

Every evaluation scores the same samples, the first `eval.iters x data.global_batch_size` of the
validation set (all of it when smaller), so values at different steps compare the same data. They
are cut into micro-batches of `data.micro_batch_size`, dealt round-robin to the data-parallel ranks:
each sample is scored exactly once whatever the DP size, and a rank may get one micro-batch fewer
(or none) without any collective waiting for it (TP collectives run inside a DP rank's TP group,
whose ranks all hold the same micro-batches). The loss is the token-weighted mean over every
labelled token, all-reduced as (sum, count) over the DP group, so it equals the single-process value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import attrs
import torch
import torch.distributed as dist

from omnicore.comm import LOCAL, Comm
from omnicore.config import ThinkerConfig
from omnicore.data.errors import DataStats
from omnicore.data.loader import SampleSource, load_micro_batches
from omnicore.eval import validation_loss
from omnicore.models.thinker import head_token_losses, prepare_inputs
from omnicore.ops import Ops
from omnicore.params import Params
from omnicore_dist.mesh import Mesh
from omnicore_dist.pipeline import StageExecutor

__all__ = ["validation_groups", "Validation", "validate"]


def validation_groups(n_samples: int, *, limit: int, micro_batch: int, dp_size: int, dp_rank: int) -> list[list[int]]:
    """Rank `dp_rank`'s micro-batches of samples [0, min(n_samples, limit)): micro-batch j goes to
    rank j mod dp_size, so the ranks together cover each sample exactly once."""
    if micro_batch < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need micro_batch >= 1 and 0 <= dp_rank < dp_size; got {micro_batch}, {dp_rank}, {dp_size}")
    count = min(n_samples, limit)
    batches = [list(range(start, min(start + micro_batch, count))) for start in range(0, count, micro_batch)]
    return batches[dp_rank::dp_size]


@attrs.frozen
class Validation:
    """One evaluation: the mean loss over `targets` labelled tokens of `samples` samples (all ranks)."""

    step: int
    loss: float
    targets: int
    samples: int
    seconds: float
    problems: tuple[str, ...] = ()

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def as_event(self) -> dict:
        return {"step": self.step, "val_loss": self.loss, "val_ppl": self.perplexity, "val_targets": self.targets,
                "val_samples": self.samples, "val_seconds": self.seconds}  # fmt: skip


def validate(params: Params, cfg: ThinkerConfig, source: SampleSource | None, groups: Sequence[Sequence[int]], *, step: int,
             mesh: Mesh, ops: Ops, comm: Comm = LOCAL, stats: DataStats | None = None, pipe=None) -> Validation:  # fmt: skip
    """Score this rank's `groups` (no gradients, parameters untouched) and reduce over the DP group.

    Collective over the DP group (and the TP group through `comm`): every rank of the run calls it.
    With pipeline stages (`pipe`, omnicore_dist.train.PipelineState) the first stage reads the
    micro-batches (`source` is None on the others), they run forward through the stages, and the
    last stage's sums reach every stage."""
    started = time.perf_counter()
    batches, problems = [], []
    if source is not None:
        for batch, found in load_micro_batches(source, groups, stats=stats):
            problems += found
            batches += [batch] if batch is not None else []
    samples = sum(int(b["cu_seqlens"].numel()) - 1 for b in batches)
    if pipe is None:
        result = validation_loss(params, cfg, batches, ops=ops, comm=comm)
        counts = torch.tensor([result.total, result.targets, samples], dtype=torch.float64)
    else:
        counts = _pipeline_sums(params, cfg, batches, samples, pipe=pipe, ops=ops, comm=comm)
    if mesh.dp > 1:
        dist.all_reduce(counts, group=mesh.dp_group)
    if pipe is not None:
        counts = pipe.p2p.broadcast_from_last(counts.to(pipe.p2p.device)).cpu()
    total, targets, samples = counts.tolist()
    loss = total / targets if targets else math.nan
    return Validation(step=step, loss=loss, targets=int(targets), samples=int(samples), seconds=time.perf_counter() - started,
                      problems=tuple(problems))  # fmt: skip


def _pipeline_sums(params: Params, cfg: ThinkerConfig, batches: Sequence, samples: int, *, pipe, ops: Ops, comm: Comm) -> torch.Tensor:
    """(loss sum, targets, samples) of this pipeline's micro-batches, on its last stage (the first
    stage's sample count travels with the micro-batch count)."""
    p2p = pipe.p2p
    inputs = [prepare_inputs(cfg, b) for b in batches] if p2p.stage == 0 else []
    header = p2p.broadcast_from_first(torch.tensor([len(inputs), samples], dtype=torch.float64, device=p2p.device)).cpu()
    sums = torch.tensor([0.0, 0.0, float(header[1])], dtype=torch.float64)

    def forward(i: int, payload: dict):
        inp, out = pipe.forward(params, cfg, inputs, i, payload, ops=ops, comm=comm)
        if not pipe.last:
            return out
        losses, _ = head_token_losses(params, cfg, inp, out["hidden"], ops=ops, comm=comm)
        sums[0] += float(losses.double().sum())
        sums[1] += losses.numel()
        return losses

    StageExecutor(p2p, forward).forward_only(int(header[0]))
    return sums
