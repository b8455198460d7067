"""AdamW over flat parameter dicts, global grad-norm clipping, and ZeRO-1 (the distributed optimizer).

The update is torch.optim.AdamW's (Loshchilov & Hutter, decoupled weight decay, bias-corrected moments):
    p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
always in fp32: bf16 / fp16 parameters get an fp32 master copy, updated and then cast back into the
model tensor in place. State is a flat dict with stable names, `step`, `exp_avg.<param>`,
`exp_avg_sq.<param>` and `master.<param>` (low-precision parameters only), so it saves as safetensors.
Frozen parameters (absent, or `requires_grad` False) have no state. Parameter groups come from the
names (`group_fn`). ZeRO-1 keeps the same names and cuts every parameter into DP equal chunks (module
notes at `ZeroAdamW`); `zero_to_plain` / `plain_to_zero` / `reshard_zero` convert saved states purely.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import attrs
import torch
import torch.distributed as dist

from omnicore.params import Params, check_shapes

__all__ = [
    "GroupRule",
    "GroupFn",
    "group_fn",
    "AdamW",
    "ZeroAdamW",
    "OptimStateError",
    "clip_grad_norm_",
    "all_reduce_sum",
    "shard_bounds",
    "zero_to_plain",
    "plain_to_zero",
    "reshard_zero",
    "ZERO_FORMAT",
]

# (regex searched in the parameter name, lr multiplier or None, weight decay or None)
GroupRule = tuple[str, float | None, float | None]
GroupFn = Callable[[str], tuple[float, float]]  # name -> (lr multiplier, weight decay)

ZERO_FORMAT = "omnicore-zero1"
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_KINDS = ("exp_avg", "exp_avg_sq", "master")


class OptimStateError(ValueError):
    """An optimizer state or gradient dict that does not fit the optimizer; the message names the entries."""


def group_fn(rules: Sequence[GroupRule] | GroupFn, *, weight_decay: float) -> GroupFn:
    """Resolve per-parameter (lr multiplier, weight decay) from rules, or pass a callable through.

    For each field separately, the first rule whose regex matches (`re.search`) and whose value for
    that field is not None wins; unmatched fields default to (1.0, weight_decay). So rules compose:
    `[(r"^vision\\.", 0.1, None), (r"(norm[^.]*\\.weight|\\.bias)$", None, 0.0)]` gives vision a tenth
    of the lr and exempts every norm and bias (vision's included) from weight decay.
    """
    if callable(rules):
        return rules
    compiled = [(re.compile(pattern), scale, decay) for pattern, scale, decay in rules]

    def resolve(name: str) -> tuple[float, float]:
        scale = next((s for p, s, _ in compiled if s is not None and p.search(name)), 1.0)
        decay = next((d for p, _, d in compiled if d is not None and p.search(name)), weight_decay)
        return float(scale), float(decay)

    return resolve


def _fused_available(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel runs on `device` (CPU and CUDA in recent torch; not every backend)."""
    one = [torch.zeros(1, device=device)]
    try:
        torch._fused_adamw_(one, one, [torch.zeros(1, device=device)], [torch.zeros(1, device=device)], [],
                            [torch.ones((), device=device)], lr=0.0, beta1=0.9, beta2=0.9, weight_decay=0.0,
                            eps=1e-8, amsgrad=False, maximize=False)  # fmt: skip
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def _adamw_(targets, grads, exp_avgs, exp_avg_sqs, *, lr, weight_decay, betas, eps, step, fused) -> None:
    """One AdamW step in place on equal-length lists of same-shaped fp32 tensors (grads are read only)."""
    beta1, beta2 = betas
    if fused:
        # The kernel reads (never writes) its step tensors, so one shared 0-d tensor serves all.
        step_t = torch.tensor(float(step), device=targets[0].device)
        torch._fused_adamw_(targets, grads, exp_avgs, exp_avg_sqs, [], [step_t] * len(targets), lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                            maximize=False)  # fmt: skip
        return
    if weight_decay:
        torch._foreach_mul_(targets, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(1.0 - beta2**step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(targets, exp_avgs, denom, -lr / (1.0 - beta1**step))


@attrs.frozen
class _Group:
    """Parameters sharing (lr multiplier, weight decay): the lists the update runs over."""

    lr_scale: float
    weight_decay: float
    names: tuple[str, ...]
    targets: list  # fp32: the master copy, or the parameter itself when it is fp32
    exp_avgs: list
    exp_avg_sqs: list


def _check_entries(found: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    try:
        check_shapes({k: v.shape for k, v in found.items()}, expected, source=what)
    except ValueError as err:
        raise OptimStateError(str(err)) from None


class AdamW:
    """AdamW over a flat dict; parameters with `requires_grad` False are frozen and get no state.

    `step(grads, lr=...)` updates the given parameter tensors in place; `lr` is the base rate of this
    step (e.g. `lr_at(schedule, opt.num_steps)`), multiplied per parameter by its group's multiplier.
    `impl`: "fused" (torch's fused kernel), "foreach" (torch._foreach_* ops) or "auto" (fused where
    the kernel runs). Measured on the 2-core dev CPU, 50 M fp32 parameters, best of 9: fused 25 ms,
    foreach 65 ms per step (torch.optim.AdamW: fused 25, foreach 61, for-loop 59); bf16 parameters
    with fp32 masters: fused 44 ms, foreach 107 ms.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, groups: Sequence[GroupRule] | GroupFn = (),
                 impl: Literal["auto", "fused", "foreach"] = "auto"):  # fmt: skip
        self._setup({n: p for n, p in params.items() if p.requires_grad}, lr=lr, betas=betas, eps=eps,
                    weight_decay=weight_decay, groups=groups, impl=impl)  # fmt: skip

    @classmethod
    def _over(cls, tensors: Mapping[str, torch.Tensor], **hyper) -> AdamW:
        """An AdamW over exactly `tensors` (ZeRO passes detached views of its slices, no frozen filter)."""
        opt = cls.__new__(cls)
        opt._setup(dict(tensors), **hyper)
        return opt

    def _setup(self, params: Params, *, lr, betas, eps, weight_decay, groups, impl) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0) or eps < 0.0 or lr < 0.0:
            raise ValueError(f"bad AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}")
        bad = sorted(f"{n} ({p.dtype})" for n, p in params.items() if p.dtype not in (torch.float32, *_LOW_PRECISION))
        if bad:
            raise ValueError(f"AdamW updates fp32, bf16 or fp16 parameters; got {', '.join(bad)}")
        devices = {p.device for p in params.values()}
        if len(devices) > 1:
            raise ValueError(f"AdamW parameters must share one device, found {sorted(map(str, devices))}")
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self._params = {n: params[n] for n in sorted(params)}
        self._num_steps = 0
        device = next(iter(devices)) if devices else torch.device("cpu")
        if impl not in ("auto", "fused", "foreach"):
            raise ValueError(f"AdamW impl {impl!r}: choose auto, fused or foreach")
        self._fused = impl != "foreach" and _fused_available(device)
        if impl == "fused" and not self._fused:
            raise ValueError(f"torch's fused AdamW kernel does not run on {device}; use impl='foreach' or 'auto'")
        self._state: Params = {}
        resolve = group_fn(groups, weight_decay=weight_decay)
        by_group: dict[tuple[float, float], list[str]] = {}
        with torch.no_grad():
            for name, p in self._params.items():
                target = p.detach().float() if p.dtype in _LOW_PRECISION else p.detach()  # a copy / an alias
                if p.dtype in _LOW_PRECISION:
                    self._state[f"master.{name}"] = target
                self._state[f"exp_avg.{name}"] = torch.zeros_like(target)
                self._state[f"exp_avg_sq.{name}"] = torch.zeros_like(target)
                by_group.setdefault(resolve(name), []).append(name)
        self._groups = [
            _Group(scale, decay, tuple(names), [self._target(n) for n in names],
                   [self._state[f"exp_avg.{n}"] for n in names], [self._state[f"exp_avg_sq.{n}"] for n in names])
            for (scale, decay), names in by_group.items()
        ]  # fmt: skip
        low = [n for n, p in self._params.items() if p.dtype in _LOW_PRECISION]
        self._low = ([self._params[n] for n in low], [self._state[f"master.{n}"] for n in low])

    def _target(self, name: str) -> torch.Tensor:
        return self._state.get(f"master.{name}", self._params[name])

    @property
    def names(self) -> tuple[str, ...]:
        """The trainable parameters this optimizer updates, sorted."""
        return tuple(self._params)

    @property
    def num_steps(self) -> int:
        """Updates taken so far (the schedule's `step` for the next update)."""
        return self._num_steps

    @property
    def fused(self) -> bool:
        return self._fused

    def groups(self) -> dict[str, tuple[float, float]]:
        """name -> (lr multiplier, weight decay), as resolved at construction."""
        return {n: (g.lr_scale, g.weight_decay) for g in self._groups for n in g.names}

    @torch.no_grad()
    def step(self, grads: Mapping[str, torch.Tensor], *, lr: float | None = None) -> None:
        """Update every trainable parameter in place from `grads` (one per trainable name, its shape).

        Gradients of any float dtype are read in fp32 and never modified.
        """
        _check_entries(grads, {n: tuple(p.shape) for n, p in self._params.items()}, "gradients")
        self._num_steps += 1
        base = self.lr if lr is None else lr
        for g in self._groups:
            _adamw_(g.targets, [grads[n].float() for n in g.names], g.exp_avgs, g.exp_avg_sqs, lr=base * g.lr_scale,
                    weight_decay=g.weight_decay, betas=self.betas, eps=self.eps, step=self._num_steps,
                    fused=self._fused)  # fmt: skip
        if self._low[0]:
            torch._foreach_copy_(*self._low)  # round the fp32 masters into the bf16 / fp16 model tensors

    def _expected(self) -> dict[str, tuple[int, ...]]:
        return {"step": (), **{k: tuple(v.shape) for k, v in self._state.items()}}

    def state_dict(self) -> Params:
        """`step` (0-d int64) plus the live fp32 state tensors (not copies: save before the next step)."""
        return {"step": torch.tensor(self._num_steps, dtype=torch.int64), **self._state}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy `state` in; masters are also cast into the model tensors (they are the truth).

        Raises OptimStateError naming every missing, unexpected or mis-shaped entry.
        """
        _check_entries(state, self._expected(), "optimizer state")
        if state["step"].is_floating_point() or int(state["step"]) < 0:
            raise OptimStateError(f"optimizer state: 'step' must be a non-negative integer, got {state['step']}")
        for key, dst in self._state.items():
            dst.copy_(state[key])
        self._num_steps = int(state["step"])
        if self._low[0]:
            torch._foreach_copy_(*self._low)


def clip_grad_norm_(grads: Mapping[str, torch.Tensor], max_norm: float | None, *,
                    reduce_sq: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """Scale `grads` in place so their global L2 norm is at most `max_norm`; return the pre-clip norm.

    The norm is accumulated in fp32 whatever the gradient dtype. `reduce_sq` receives this process's
    sum of squares (0-d fp32, on the gradients' device, CPU when there are none) and returns the total
    over the processes that share the model (`all_reduce_sum(group)`: ZeRO's DP group, TP / PP groups);
    every process must call it, also one with no gradients. Replicated tensors (TP norms) must be
    passed by one rank only, or they are counted twice. A NaN / Inf norm leaves the gradients
    untouched and is returned as is (the caller decides to stop or skip); None or <= 0 only measures.
    Scaling matches torch.nn.utils.clip_grad_norm_: g *= min(1, max_norm / (norm + 1e-6)).
    """
    tensors = list(grads.values())
    if tensors:
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        sq = torch.stack(norms).square().sum()
    else:
        sq = torch.zeros((), dtype=torch.float32)
    if reduce_sq is not None:
        sq = reduce_sq(sq)
    norm = sq.sqrt()
    if tensors and max_norm is not None and max_norm > 0:
        # No host sync: the coefficient stays a tensor and is 1 (an exact no-op) when not finite.
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, group in by_dtype.items():
            torch._foreach_mul_(group, coef.to(dtype))
    return norm


def all_reduce_sum(group) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `reduce_sq` hook summing over `group` (a torch.distributed process group) in place."""

    def reduce(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    return reduce


def shard_bounds(numel: int, dp_size: int) -> list[tuple[int, int]]:
    """ZeRO-1 slices of one flattened parameter: rank r owns [r * c, (r + 1) * c) clipped to numel,
    with c = ceil(numel / dp_size); trailing ranks of a tiny tensor may own nothing."""
    if dp_size < 1:
        raise ValueError(f"dp size must be >= 1 (got {dp_size})")
    chunk = -(-numel // dp_size)
    return [(min(r * chunk, numel), min((r + 1) * chunk, numel)) for r in range(dp_size)]


@attrs.frozen
class _Bucket:
    """Parameters of one dtype communicated together; each rank's segment holds every parameter's chunk."""

    dtype: torch.dtype
    names: tuple[str, ...]
    offsets: tuple[int, ...]  # start of each parameter's chunk inside one rank's segment
    size: int  # one rank's segment length


def _plan_buckets(params: Params, dp_size: int, bucket_numel: int) -> list[_Bucket]:
    """Greedy buckets per dtype, in name order, of at most `bucket_numel` elements per rank (a bigger
    parameter gets a bucket of its own)."""
    buckets: list[_Bucket] = []
    for dtype in sorted({p.dtype for p in params.values()}, key=str):
        names, offsets, size = [], [], 0
        for name in sorted(n for n, p in params.items() if p.dtype == dtype):
            chunk = -(-params[name].numel() // dp_size)
            if names and size + chunk > bucket_numel:
                buckets.append(_Bucket(dtype, tuple(names), tuple(offsets), size))
                names, offsets, size = [], [], 0
            names.append(name)
            offsets.append(size)
            size += chunk
        if names:
            buckets.append(_Bucket(dtype, tuple(names), tuple(offsets), size))
    return buckets


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    if group is None:
        out.copy_(inp)
        return
    # reduce_scatter_single replaces reduce_scatter_tensor in recent torch (the old name warns).
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, inp, group=group)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    if group is None:
        out.copy_(inp)
        return
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=group)


class ZeroAdamW:
    """ZeRO-1: AdamW whose state is split over the data-parallel group `dp_group` (None: DP size 1).

    Slicing: every parameter, flattened, is cut into DP equal chunks (`shard_bounds`) and rank r owns
    chunk r of each, not a contiguous range of one concatenated space (Megatron's layout). The state
    therefore keeps the plain optimizer's names (`exp_avg.<param>` holds this rank's 1-D slice), and
    resharding to another DP size is per tensor: concatenate the slices, cut again. Nothing depends on
    bucket boundaries or on the order parameters were registered. The cost is at most DP - 1 padding
    elements per parameter in the communication buffers.

    Per step: `reduce_grads(local)` packs each rank's full gradients into fp32 buckets laid out
    (DP, segment) and reduce-scatters them (sum; `average` divides by DP), returning this rank's
    slices; the caller may clip them with `clip_grad_norm_(..., reduce_sq=all_reduce_sum(dp_group))`;
    `step(slices, lr=...)` updates the owned slices (fp32 masters for low-precision parameters) and
    all-gathers the parameters in their own dtype, bucket by bucket, so the full tensors are in
    place again on every rank. Buffers live for one bucket only.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], *, dp_group=None, average: bool = False,
                 bucket_numel: int = 2**24, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, groups: Sequence[GroupRule] | GroupFn = (),
                 impl: Literal["auto", "fused", "foreach"] = "auto"):  # fmt: skip
        trainable = {n: params[n] for n in sorted(params) if params[n].requires_grad}
        strided = sorted(n for n, p in trainable.items() if not p.is_contiguous())
        if strided:
            raise ValueError(f"ZeRO updates parameters through flat views; not contiguous: {', '.join(strided)}")
        self.dp_group = dp_group
        self.dp_size = 1 if dp_group is None else dist.get_world_size(dp_group)
        self.dp_rank = 0 if dp_group is None else dist.get_rank(dp_group)
        self.average = average
        self._params = trainable
        self._bounds = {n: shard_bounds(p.numel(), self.dp_size) for n, p in trainable.items()}
        slices = {n: self._flat(n)[slice(*self._bounds[n][self.dp_rank])] for n in trainable}
        self._inner = AdamW._over(slices, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, groups=groups, impl=impl)
        self._buckets = _plan_buckets(trainable, self.dp_size, bucket_numel)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._params)

    @property
    def num_steps(self) -> int:
        return self._inner.num_steps

    def _flat(self, name: str) -> torch.Tensor:
        return self._params[name].detach().view(-1)

    def _pieces(self, bucket: _Bucket, ranks: Sequence[int]):
        """(name, rank, piece of the flat parameter, its place in that rank's segment) for non-empty pieces."""
        for name, off in zip(bucket.names, bucket.offsets):
            for r in ranks:
                lo, hi = self._bounds[name][r]
                if hi > lo:
                    yield name, r, slice(lo, hi), slice(off, off + hi - lo)

    @torch.no_grad()
    def reduce_grads(self, grads: Mapping[str, torch.Tensor]) -> Params:
        """Reduce-scatter full local gradients over DP; returns name -> this rank's fp32 slice, (hi - lo,)."""
        _check_entries(grads, {n: tuple(p.shape) for n, p in self._params.items()}, "gradients")
        out: Params = {}
        for b in self._buckets:
            device = self._params[b.names[0]].device
            # fp32 whatever the gradient dtype: a bf16 sum over many ranks would drop low bits.
            send = torch.zeros(self.dp_size, b.size, dtype=torch.float32, device=device)  # padding stays 0
            pieces = list(self._pieces(b, range(self.dp_size)))
            if pieces:
                torch._foreach_copy_([send[r, seg] for _, r, _, seg in pieces], [grads[n].reshape(-1)[src] for n, _, src, _ in pieces])
            recv = torch.empty(b.size, dtype=torch.float32, device=device)
            _reduce_scatter(recv, send.view(-1), self.dp_group)
            if self.average:
                recv.div_(self.dp_size)
            for name, off in zip(b.names, b.offsets):
                lo, hi = self._bounds[name][self.dp_rank]
                out[name] = recv[off : off + hi - lo]
        return out

    @torch.no_grad()
    def step(self, grads: Mapping[str, torch.Tensor], *, lr: float | None = None) -> None:
        """Update this rank's slices from `grads` (as `reduce_grads` returns), then all-gather parameters."""
        self._inner.step(grads, lr=lr)  # writes the updated slices into the model tensors
        others = [r for r in range(self.dp_size) if r != self.dp_rank]
        for b in self._buckets:
            device = self._params[b.names[0]].device
            send = torch.empty(b.size, dtype=b.dtype, device=device)  # padding is never read back
            own = list(self._pieces(b, [self.dp_rank]))
            if own:
                torch._foreach_copy_([send[seg] for *_, seg in own], [self._flat(n)[src] for n, _, src, _ in own])
            recv = torch.empty(self.dp_size, b.size, dtype=b.dtype, device=device)
            _all_gather(recv.view(-1), send, self.dp_group)
            theirs = list(self._pieces(b, others))
            if theirs:
                torch._foreach_copy_([self._flat(n)[src] for n, _, src, _ in theirs], [recv[r, seg] for _, r, _, seg in theirs])

    def state_dict(self) -> Params:
        """This rank's state: `step` and 1-D slices under the plain names (see `metadata` for bounds)."""
        return self._inner.state_dict()

    def metadata(self) -> dict:
        """JSON-able description of this rank's file: format, DP rank / size, per parameter shape and bounds."""
        return _zero_meta(self.dp_rank, self.dp_size, {n: tuple(p.shape) for n, p in self._params.items()})

    def load_state_dict(self, state: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        """Load one rank's saved state; `meta` must describe this rank (else reshard with `reshard_zero`)."""
        _check_meta(meta)
        if (meta["dp_rank"], meta["dp_size"]) != (self.dp_rank, self.dp_size):
            raise OptimStateError(f"ZeRO state of DP rank {meta['dp_rank']} of {meta['dp_size']} given to rank "
                                  f"{self.dp_rank} of {self.dp_size}: reshard it first (reshard_zero)")  # fmt: skip
        wrong = _differing(meta["params"], self.metadata()["params"])
        if wrong:
            raise OptimStateError(f"ZeRO state: parameters, shapes or slice bounds differ for {', '.join(wrong)}")
        self._inner.load_state_dict(state)


def _zero_meta(dp_rank: int, dp_size: int, shapes: Mapping[str, tuple[int, ...]]) -> dict:
    params = {}
    for name, shape in sorted(shapes.items()):
        lo, hi = shard_bounds(math.prod(shape), dp_size)[dp_rank]
        params[name] = {"shape": list(shape), "begin": lo, "end": hi}
    return {"format": ZERO_FORMAT, "version": 1, "dp_rank": dp_rank, "dp_size": dp_size, "params": params}


def _differing(found: Mapping[str, dict], expected: Mapping[str, dict]) -> list[str]:
    """Parameter names present in only one of two metadata tables, or described differently."""
    return sorted(set(found) ^ set(expected) | {n for n in set(found) & set(expected) if found[n] != expected[n]})


def _check_meta(meta: Mapping) -> None:
    if meta.get("format") != ZERO_FORMAT or meta.get("version") != 1:
        raise OptimStateError(f"not a ZeRO-1 optimizer state (format {meta.get('format')!r}, version {meta.get('version')!r})")
    for key in ("dp_rank", "dp_size", "params"):
        if key not in meta:
            raise OptimStateError(f"ZeRO metadata lacks {key!r}")


def _param_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """name -> shape from the `exp_avg.*` entries, after checking every key is step or <kind>.<name>."""
    odd = sorted(k for k in state if k != "step" and k.split(".", 1)[0] not in _KINDS)
    if odd:
        raise OptimStateError(f"optimizer state: unexpected entries {', '.join(odd)}")
    return {k.split(".", 1)[1]: tuple(v.shape) for k, v in state.items() if k.startswith("exp_avg.")}


def _expected_keys(shapes: Mapping[str, tuple[int, ...]], masters: set[str]) -> dict[str, tuple[int, ...]]:
    """Every entry of a state over `shapes` (masters only for the names in `masters`) -> its shape."""
    out: dict[str, tuple[int, ...]] = {"step": ()}
    for name, shape in shapes.items():
        for kind in _KINDS if name in masters else _KINDS[:2]:
            out[f"{kind}.{name}"] = tuple(shape)
    return out


def zero_to_plain(shards: Sequence[tuple[Mapping[str, torch.Tensor], Mapping]]) -> Params:
    """Merge every DP rank's (state, metadata) into the plain AdamW state (full-shape tensors).

    Checks that all ranks 0..DP-1 are present once, agree on step and parameters, and that each
    slice has the bounds `shard_bounds` gives; errors name the rank and entry.
    """
    if not shards:
        raise OptimStateError("no ZeRO shards given")
    for _, meta in shards:
        _check_meta(meta)
    dp_size = shards[0][1]["dp_size"]
    by_rank = {meta["dp_rank"]: (state, meta) for state, meta in shards}
    if len(shards) != dp_size or sorted(by_rank) != list(range(dp_size)) or any(m["dp_size"] != dp_size for _, m in shards):
        found = sorted(f"{m['dp_rank']}/{m['dp_size']}" for _, m in shards)
        raise OptimStateError(f"ZeRO shards must be DP ranks 0..{dp_size - 1} of {dp_size} once each; got {found}")
    shapes = {n: tuple(p["shape"]) for n, p in by_rank[0][1]["params"].items()}
    masters = {k.split(".", 1)[1] for k in by_rank[0][0] if k.startswith("master.")}
    step = by_rank[0][0].get("step")
    for rank, (state, meta) in sorted(by_rank.items()):
        expect = _zero_meta(rank, dp_size, shapes)["params"]
        bad = _differing(meta["params"], expect)
        if bad:
            raise OptimStateError(f"ZeRO rank {rank}: parameters or slice bounds disagree with rank 0 for {', '.join(bad)}")
        lengths = {n: (b["end"] - b["begin"],) for n, b in expect.items()}
        _check_entries(state, _expected_keys(lengths, masters), f"ZeRO state of DP rank {rank}")
        if int(state["step"]) != int(step):
            raise OptimStateError(f"ZeRO rank {rank} is at step {int(state['step'])}, rank 0 at {int(step)}")
    plain: Params = {"step": step.clone()}
    for key in _expected_keys(shapes, masters):
        if key != "step":
            parts = [by_rank[r][0][key] for r in range(dp_size)]
            plain[key] = torch.cat(parts).view(shapes[key.split(".", 1)[1]])
    return plain


def plain_to_zero(state: Mapping[str, torch.Tensor], dp_size: int, dp_rank: int) -> tuple[Params, dict]:
    """Cut a plain AdamW state into DP rank `dp_rank`'s (state, metadata); slices are compact copies."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
    shapes = _param_shapes(state)
    masters = {k.split(".", 1)[1] for k in state if k.startswith("master.")}
    _check_entries(state, _expected_keys(shapes, masters), "plain optimizer state")
    meta = _zero_meta(dp_rank, dp_size, shapes)
    out: Params = {"step": state["step"].clone()}
    for key, value in state.items():
        if key != "step":
            bounds = meta["params"][key.split(".", 1)[1]]
            out[key] = value.reshape(-1)[bounds["begin"] : bounds["end"]].clone()
    return out, meta


def reshard_zero(shards: Sequence[tuple[Mapping[str, torch.Tensor], Mapping]], dp_size: int) -> list[tuple[Params, dict]]:
    """Saved ZeRO shards of any DP size -> (state, metadata) for each rank of `dp_size` (pure; holds the
    full state in memory once)."""
    plain = zero_to_plain(shards)
    return [plain_to_zero(plain, dp_size, r) for r in range(dp_size)]
