"""The training loop: micro-batches with gradient accumulation, data parallelism, logging, saving.

One global step: every DP rank prepares its micro-batches (host work, once), the step's target
counts are all-reduced first so each micro-batch's loss can be scaled by the *global* denominator
(loss per token over the global batch by default; the recipe's per-micro-batch mean and per-sample
mean as options), gradients accumulate in one flat fp32 buffer (parameters a micro-batch does not
use simply add nothing: a rank without images still joins every reduction, so nothing hangs), the
buffer is all-reduced in buckets, the global norm is checked (NaN / Inf stops or skips the step on
every rank alike) and clipped, and the optimizer updates the trainable parameters in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs
import torch
import torch.distributed as dist

from omnicore.comm import LOCAL
from omnicore.config import ThinkerConfig
from omnicore.layout import Stage
from omnicore.models.recompute import Recompute
from omnicore.models.thinker import (
    IGNORE_INDEX,
    ThinkerInputs,
    head_token_losses,
    inputs_from_meta,
    inputs_meta,
    prepare_inputs,
    stage_forward,
    thinker_token_losses,
)
from omnicore.ops import Ops
from omnicore.params import Params
from omnicore_dist.hetero import sum_encoder_replicas
from omnicore_dist.mesh import Mesh
from omnicore_dist.optim import ZeroAdamW
from omnicore_dist.pipeline import P2P, StageExecutor, StageTrace
from omnicore_dist.tp import GradRole, sum_partial, sum_replicated_kv
from omnicore_dist.watchdog import operation

__all__ = ["part_of", "model_flops", "GradBuffer", "StepResult", "BadStep", "TPState", "PipelineState", "global_norm", "train_step",
           "pipeline_train_step", "recompute_spec"]  # fmt: skip

_BUCKET_BYTES = 32 * 2**20


def part_of(name: str) -> str:
    """The freezable part a parameter belongs to (model.freeze, train.lr_mult)."""
    if name.startswith("vision.merger."):
        return "vision_merger"
    if name.startswith("vision."):
        return "vision"
    if name.startswith("audio.proj."):
        return "audio_proj"
    if name.startswith("audio."):
        return "audio"
    return "llm"


def recompute_spec(cfg: ThinkerConfig, setting: Mapping[str, str | int]) -> Recompute:
    """`model.recompute`: tower (`llm` / `vision` / `audio`) -> "full" (every layer), "uniform"
    (every other layer) or N (the first N layers, the recipe's block method)."""
    depth = {"llm": cfg.text.n_layers, "vision": cfg.vision.depth, "audio": cfg.audio.n_layers}
    chosen: dict[str, frozenset[int]] = {}
    for tower, how in setting.items():
        if tower not in depth:
            raise ValueError(f"model.recompute: unknown tower {tower!r}; choose from {list(depth)}")
        if how == "full":
            chosen[tower] = frozenset(range(depth[tower]))
        elif how == "uniform":
            chosen[tower] = frozenset(range(0, depth[tower], 2))
        elif isinstance(how, int) and 0 <= how <= depth[tower]:
            chosen[tower] = frozenset(range(how))
        else:
            raise ValueError(f"model.recompute.{tower}: expected 'full', 'uniform' or 0..{depth[tower]}, got {how!r}")
    return Recompute(text=chosen.get("llm", ()), vision=chosen.get("vision", ()), audio=chosen.get("audio", ()))


class GradBuffer:
    """One flat fp32 buffer holding the gradient of every trainable parameter.

    fp32 parameters get views of it as their `.grad`, so autograd accumulates straight into it;
    lower-precision parameters have their gradients added in after each micro-batch (fp32
    accumulation). The DP all-reduce runs over contiguous slices, with no copies.
    """

    def __init__(self, params: Mapping[str, torch.Tensor]):
        self.names = list(params)
        total = sum(p.numel() for p in params.values())
        device = next(iter(params.values())).device if params else torch.device("cpu")
        self.flat = torch.zeros(total, dtype=torch.float32, device=device)
        self.views: dict[str, torch.Tensor] = {}
        offset = 0
        for name, p in params.items():
            self.views[name] = self.flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        self.params = params

    def zero(self) -> None:
        self.flat.zero_()
        for name, p in self.params.items():
            p.grad = self.views[name] if p.dtype == torch.float32 else None

    def collect(self) -> None:
        """Fold low-precision gradients of the last backward into the buffer."""
        for name, p in self.params.items():
            if p.grad is not None and p.dtype != torch.float32:
                self.views[name].add_(p.grad)
                p.grad = None

    def release(self) -> None:
        """Detach the buffer from the parameters between steps."""
        for p in self.params.values():
            p.grad = None

    def all_reduce(self, group) -> None:
        step = max(1, _BUCKET_BYTES // 4)
        for start in range(0, self.flat.numel(), step):
            dist.all_reduce(self.flat[start : start + step], group=group)


@attrs.frozen
class StepResult:
    loss: float
    grad_norm: float
    tokens: int  # every real token of the global batch
    targets: int
    samples: int
    modality_tokens: Mapping[str, int]
    applied: bool  # False when a non-finite loss / norm skipped the update
    flops: float = 0.0  # model FLOPs of this rank's micro-batches (forward + backward)
    pipeline: StageTrace | None = None  # this stage's schedule, under pipeline parallelism


class BadStep(RuntimeError):
    """A non-finite loss or gradient norm; parameters are as before the step."""


def _counts(inputs: Sequence[ThinkerInputs]) -> torch.Tensor:
    """Local (targets, micro-batches, samples with targets, tokens, image, video, audio tokens)."""
    targets = samples = tokens = images = videos = audios = 0
    for inp in inputs:
        keep = inp.targets != IGNORE_INDEX
        targets += int(keep.sum())
        samples += int(torch.unique(inp.segments.segment_ids()[keep]).numel())
        tokens += inp.input_ids.numel()
        images += 0 if inp.images is None else inp.images.slots.numel()
        videos += 0 if inp.videos is None else inp.videos.slots.numel()
        audios += 0 if inp.audios is None else inp.audios.slots.numel()
    return torch.tensor([targets, len(inputs), samples, tokens, images, videos, audios], dtype=torch.float64)


def model_flops(cfg: ThinkerConfig, inputs: Sequence[ThinkerInputs]) -> float:
    """Forward + backward FLOPs: 6 per weight per token through every tower's linear layers, plus
    causal text attention (6 x L x C x length^2 per sample) and the windowed / chunked encoder
    attention (12 x layers x width x length^2 per segment). Frozen towers are counted like trained
    ones (the usual MFU convention)."""
    t, v, a = cfg.text, cfg.vision, cfg.audio
    text_weights = t.n_layers * (2 * t.hidden * t.hidden + 2 * t.hidden * t.n_kv_heads * t.head_dim + 3 * t.hidden * t.ffn)
    vision_weights = v.depth * (4 * v.hidden * v.hidden + 3 * v.hidden * v.ffn)
    audio_weights = a.n_layers * (4 * a.d_model * a.d_model + 2 * a.d_model * a.ffn)
    flops = 0.0
    for inp in inputs:
        keep = int((inp.targets != IGNORE_INDEX).sum()) if inp.targets is not None else 0
        flops += 6 * text_weights * inp.input_ids.numel() + 6 * t.hidden * t.vocab_size * keep
        flops += sum(6 * t.n_layers * t.hidden * n * n for n in inp.segments.lengths)
        for media in (inp.images, inp.videos):
            if media is not None:
                patches = media.values.shape[0]
                flops += 6 * vision_weights * patches + sum(12 * v.depth * v.hidden * n * n for n in media.layout.windows.lengths)
        if inp.audios is not None:
            frames = inp.audios.layout.kept.sum().item()
            flops += 6 * audio_weights * frames + sum(12 * a.n_layers * a.d_model * n * n for n in inp.audios.layout.chunks.lengths)
    return flops


def _objective(losses: torch.Tensor, sample_ids: torch.Tensor, mode: str, totals: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the global loss, already divided by the global denominator."""
    targets, micro, samples = totals[0].item(), totals[1].item(), totals[2].item()
    if mode == "token":
        return losses.sum() / max(targets, 1.0)
    if mode == "micro_batch":  # the recipe's default: mean per micro-batch, averaged
        return (losses.mean() if losses.numel() else losses.sum()) / micro
    per_sample = torch.zeros(int(sample_ids.max()) + 1 if sample_ids.numel() else 0, device=losses.device)
    per_sample = per_sample.index_add(0, sample_ids, losses)
    counts = torch.bincount(sample_ids, minlength=per_sample.numel()).clamp(min=1)
    return (per_sample / counts).sum() / max(samples, 1.0)


def global_norm(grads: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None, groups: Sequence) -> torch.Tensor:
    """L2 norm over every parameter's gradient once: squares accumulated in fp32, each tensor's
    weighted by `weights` (1 / its TP copies), summed over `groups` (TP, and DP for ZeRO slices)."""
    tensors = list(grads.values())
    if tensors:
        norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
        w = torch.tensor([weights[n] for n in grads], dtype=torch.float32) if weights else torch.ones(len(tensors))
        sq = (norms.square() * w.to(norms.device)).sum()
    else:
        sq = torch.zeros((), dtype=torch.float32)
    for group in groups:
        dist.all_reduce(sq, group=group)
    return sq.sqrt()


def _update(optimizer, grads: GradBuffer, mesh: Mesh, tp: TPState | None, *, clip_grad: float, lr: float, loss: float,
            allow_skip: bool) -> tuple[float, bool]:  # fmt: skip
    """Reduce gradients over TP copies and DP, measure / clip the global norm, and step unless
    something is non-finite.

    Plain AdamW: the flat buffer is all-reduced in buckets. ZeRO-1: gradients are reduce-scattered
    and the norm's squares also summed over the DP group. Returns (pre-clip norm, applied)."""
    if tp is not None:
        sum_replicated_kv(grads.views, tp.roles, rank=mesh.tp_rank, group=mesh.tp_group)
        sum_partial(grads.views, tp.roles, group=mesh.tp_group)
        sum_encoder_replicas(grads.flat, grads.views, tp.roles, getattr(tp.comm, "encoders", {}))  # hetero parallel
    groups = [mesh.tp_group] if tp is not None else []
    groups += [mesh.pp_group] if mesh.pp > 1 else []  # every stage holds other parameters
    if isinstance(optimizer, ZeroAdamW):
        slices = optimizer.reduce_grads(grads.views)
        groups += [mesh.dp_group] if mesh.dp > 1 else []
    else:
        if mesh.dp > 1:
            grads.all_reduce(mesh.dp_group)
        slices = grads.views
    norm = float(global_norm(slices, tp.weights if tp is not None else None, groups))
    if not (math.isfinite(loss) and math.isfinite(norm)):
        if not allow_skip:
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise BadStep(f"non-finite {what} (loss {loss}, grad norm {norm}); parameters are unchanged")
        return norm, False
    if clip_grad > 0 and norm > clip_grad and slices:  # (a stage with nothing to train has no slices)
        torch._foreach_mul_(list(slices.values()), clip_grad / (norm + 1e-6))  # torch's clip_grad_norm_ rule
    optimizer.step(slices, lr=lr)
    return norm, True


@attrs.frozen
class TPState:
    """This rank's tensor-parallel context: the Comm the model calls and each gradient's role."""

    comm: object
    roles: Mapping[str, GradRole]
    weights: Mapping[str, float]


def train_step(
    params: Params,
    grads: GradBuffer,
    optimizer,
    cfg: ThinkerConfig,
    micro_batches: Sequence[Mapping | ThinkerInputs],
    *,
    lr: float,
    mesh: Mesh,
    ops: Ops,
    loss_reduction: str = "token",
    clip_grad: float = 0.0,
    recompute: Recompute = Recompute(),
    allow_skip: bool = False,
    autocast: torch.dtype | None = None,
    tp: TPState | None = None,
) -> StepResult:
    """One optimizer step over this rank's micro-batches (collective across the DP and TP groups).

    Raises BadStep on a non-finite loss or norm unless `allow_skip` (then nothing is updated).
    """
    inputs = [mb if isinstance(mb, ThinkerInputs) else prepare_inputs(cfg, mb) for mb in micro_batches]
    totals = _counts(inputs)
    if mesh.dp > 1:
        with operation("all-reduce of the step's target counts (DP)"):
            dist.all_reduce(totals, group=mesh.dp_group)
    grads.zero()
    loss_sum = torch.zeros((), dtype=torch.float64)
    device = grads.flat.device
    for inp in inputs:
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            losses, sample_ids = thinker_token_losses(params, cfg, inp, ops=ops, recompute=recompute, comm=tp.comm if tp else LOCAL)
        objective = _objective(losses, sample_ids, loss_reduction, totals)
        objective.backward()
        grads.collect()
        loss_sum += objective.detach().double().cpu()
    with operation("gradient reduction and norm (TP / DP)"):
        if mesh.dp > 1:
            dist.all_reduce(loss_sum, group=mesh.dp_group)
        loss = float(loss_sum)
        norm, applied = _update(optimizer, grads, mesh, tp, clip_grad=clip_grad, lr=lr, loss=loss, allow_skip=allow_skip)
    grads.release()
    return _result(totals, loss, norm, applied, model_flops(cfg, inputs))


def _result(totals: torch.Tensor, loss: float, norm: float, applied: bool, flops: float, pipeline: StageTrace | None = None) -> StepResult:
    t = totals.tolist()  # _counts' order
    return StepResult(
        loss=loss,
        grad_norm=norm,
        tokens=int(t[3]),
        targets=int(t[0]),
        samples=int(t[2]),
        modality_tokens={"text": int(t[3] - t[4] - t[5] - t[6]), "image": int(t[4]), "video": int(t[5]), "audio": int(t[6])},
        applied=applied,
        flops=flops,
        pipeline=pipeline,
    )


@attrs.frozen
class PipelineState:
    """This rank's pipeline stage: its plan entry, the exchange with its neighbours, the schedule."""

    stage: Stage
    p2p: P2P
    schedule: str = "1f1b"

    @property
    def last(self) -> bool:
        return self.p2p.stage == self.p2p.stages - 1

    def forward(self, params: Params, cfg: ThinkerConfig, inputs: Sequence[ThinkerInputs], i: int, payload: Mapping[str, torch.Tensor], *,
                ops: Ops, comm, recompute: Recompute = Recompute()) -> tuple[ThinkerInputs, dict[str, torch.Tensor]]:  # fmt: skip
        """Micro-batch i through this stage: its inputs (the first stage's own `inputs[i]`, else rebuilt
        from the payload's metadata) and the stage's outputs, plus that metadata unless this is the last."""
        first = self.p2p.stage == 0
        meta = {k: v for k, v in payload.items() if not v.is_floating_point()}
        inp = inputs[i] if first else inputs_from_meta(cfg, meta)
        carry = {k: v for k, v in payload.items() if v.is_floating_point()}
        out = stage_forward(params, cfg, self.stage, inp, carry, ops=ops, comm=comm, recompute=recompute)
        return inp, out if self.last else out | (inputs_meta(inp) if first else meta)


def pipeline_train_step(
    params: Params,
    grads: GradBuffer,
    optimizer,
    cfg: ThinkerConfig,
    micro_batches: Sequence[Mapping | ThinkerInputs] | None,
    *,
    pipe: PipelineState,
    lr: float,
    mesh: Mesh,
    ops: Ops,
    loss_reduction: str = "token",
    clip_grad: float = 0.0,
    recompute: Recompute = Recompute(),
    allow_skip: bool = False,
    autocast: torch.dtype | None = None,
    tp: TPState | None = None,
) -> StepResult:
    """`train_step` for one pipeline stage (collective over the pipeline, DP and TP groups).

    Only the first stage reads micro-batches (`micro_batches`; None on the others). It counts the
    step's targets (all-reduced over DP, as `train_step` does) and sends the counts down the
    pipeline, so the last stage scales each micro-batch's loss by the global denominator. Each
    micro-batch's payload carries the inputs' metadata with the activations; the loss comes back from
    the last stage, and the gradient norm sums over the stages."""
    p2p, first, last = pipe.p2p, pipe.p2p.stage == 0, pipe.last
    inputs: list[ThinkerInputs] = []
    header = torch.zeros(9, dtype=torch.float64)  # micro-batches, the 7 counts, model FLOPs
    if first:
        inputs = [mb if isinstance(mb, ThinkerInputs) else prepare_inputs(cfg, mb) for mb in micro_batches]
        totals = _counts(inputs)
        if mesh.dp > 1:
            with operation("all-reduce of the step's target counts (DP)"):
                dist.all_reduce(totals, group=mesh.dp_group)
        header = torch.cat([torch.tensor([float(len(inputs))], dtype=torch.float64), totals, torch.tensor([model_flops(cfg, inputs)], dtype=torch.float64)])
    with operation("step header from the first pipeline stage"):
        header = p2p.broadcast_from_first(header.to(p2p.device)).cpu()
    micro, totals = int(header[0]), header[1:8]
    comm = tp.comm if tp else LOCAL
    loss_sum = torch.zeros((), dtype=torch.float64)

    def forward(i: int, payload: dict) -> dict | torch.Tensor:
        nonlocal loss_sum
        with torch.autocast(p2p.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            inp, out = pipe.forward(params, cfg, inputs, i, payload, ops=ops, comm=comm, recompute=recompute)
            if not last:
                return out
            losses, sample_ids = head_token_losses(params, cfg, inp, out["hidden"], ops=ops, comm=comm)
        objective = _objective(losses, sample_ids, loss_reduction, totals)
        loss_sum += objective.detach().double().cpu()
        return objective

    grads.zero()
    with operation(f"pipeline schedule ({pipe.schedule}: stage {p2p.stage} exchanging with its neighbours)"):
        trace = StageExecutor(p2p, forward, after_backward=grads.collect).run(pipe.schedule, micro)
    with operation("gradient reduction and norm (TP / DP / PP)"):
        if last and mesh.dp > 1:
            dist.all_reduce(loss_sum, group=mesh.dp_group)
        loss = float(p2p.broadcast_from_last(loss_sum.to(p2p.device)))
        norm, applied = _update(optimizer, grads, mesh, tp, clip_grad=clip_grad, lr=lr, loss=loss, allow_skip=allow_skip)
    grads.release()
    return _result(totals, loss, norm, applied, float(header[8]), trace)
