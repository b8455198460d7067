"""Low-rank adapters (LoRA) on the thinker's linear layers, as pure functions over flat dicts.

A targeted layer `y = x W^T + b` becomes `y = x W^T + b + scale * (dropout(x) A^T) B^T` with
A (r, in) and B (out, r), scale = alpha / r (rsLoRA: alpha / sqrt(r)); PEFT's `lora.Linear`.
Adapters live in their own flat dict named after the layer (`text.layers.3.attn.q.lora_A` /
`.lora_B`), so a pipeline stage or TP shard selects them with the same prefixes as the base.
The model functions never hear of LoRA: `adapted(base, adapters, spec)` returns the base dict in
which each targeted weight is a `LoraWeight`, a tensor that *is* the frozen base weight but
adds its adapter whenever it is used by `F.linear` (every linear of the towers goes through
`F.linear` / `omnicore.comm.row_linear`). `merge` folds adapters into plain weights (export, fast
inference). Adapters are fp32 (the base may stay bf16); the adapter path is computed in their
dtype, like PEFT, and added in the base output's dtype.
Under tensor parallelism the adapter half on the split side follows the base layer's split (B of
a column-parallel layer, A of a row-parallel one) and the other half is replicated: the forward
needs no collective beyond the base layer's; the replicated half's gradient is a partial sum
over the TP group (`replicated_half`), which the runtime adds up once per step.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping

import attrs
import torch
import torch.nn.functional as F

from omnicore.config import ThinkerConfig
from omnicore.layout import Split, TPPlan, rule_for, tower_of
from omnicore.models.thinker import param_shapes, tp_plans
from omnicore.params import Params, Shapes

__all__ = [
    "LoraSpec",
    "LoraError",
    "TARGET_NAMES",
    "TOWER_NAMES",
    "lora_layers",
    "adapter_shapes",
    "init_adapters",
    "adapter_rule",
    "adapter_tp_plan",
    "replicated_half",
    "layer_of",
    "LoraWeight",
    "adapted",
    "merge",
]


class LoraError(ValueError):
    """A LoRA setting or adapter set that cannot be used; the message names the setting."""


# The user's names for a block's linear layers -> native layer suffixes (inside `layers.{i}.` /
# `blocks.{i}.`). MindSpeed's (Megatron) names, PEFT's (HF module names of every tower) and native.
_MEGATRON = {
    "linear_qkv": ("attn.q", "attn.k", "attn.v"),
    "linear_proj": ("attn.o",),
    "linear_fc1": ("mlp.gate", "mlp.up", "mlp.fc1"),
    "linear_fc2": ("mlp.down", "mlp.fc2"),
}
_HF = {
    "q_proj": ("attn.q",),
    "k_proj": ("attn.k",),
    "v_proj": ("attn.v",),
    "o_proj": ("attn.o",),  # text
    "out_proj": ("attn.o",),  # audio
    "proj": ("attn.o",),  # vision attention output
    "gate_proj": ("mlp.gate",),
    "up_proj": ("mlp.up",),
    "down_proj": ("mlp.down",),
    "fc1": ("mlp.fc1",),  # audio
    "fc2": ("mlp.fc2",),
}
_NATIVE = {n: (f"attn.{n}",) for n in "qkvo"} | {n: (f"mlp.{n}",) for n in ("gate", "up", "down")}
_ALL = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "mlp.fc1", "mlp.fc2")
TARGET_NAMES: Mapping[str, tuple[str, ...]] = _MEGATRON | _HF | _NATIVE | {"all": _ALL}
# `lora.towers` -> native tower prefix of its blocks.
TOWER_NAMES = {"llm": "text.layers", "vision": "vision.blocks", "audio": "audio.layers"}


def _nearest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@attrs.frozen(kw_only=True)
class LoraSpec:
    """Which layers get adapters and how they scale. `targets` in any of TARGET_NAMES' vocabularies
    (mixed freely; `all` = every linear of a block), `towers` among TOWER_NAMES."""

    targets: tuple[str, ...] = attrs.field(converter=tuple)
    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    towers: tuple[str, ...] = attrs.field(default=("llm",), converter=tuple)

    def __attrs_post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoraError(f"lora.r (--lora-r) must be a positive integer rank, got {self.r!r}")
        if not self.targets:
            raise LoraError("lora.targets (--lora-target-modules) is empty: name the linear layers to adapt, or 'all'")
        for t in self.targets:
            if t not in TARGET_NAMES:
                raise LoraError(f"lora.targets: unknown target module {t!r}{_nearest(t, TARGET_NAMES)}; choose from {', '.join(TARGET_NAMES)}")
        for t in self.towers:
            if t not in TOWER_NAMES:
                raise LoraError(f"lora.towers: unknown tower {t!r}{_nearest(t, TOWER_NAMES)}; choose from {', '.join(TOWER_NAMES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora.dropout (--lora-dropout) must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_json(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> LoraSpec:
        return cls(**data)


def lora_layers(cfg: ThinkerConfig, spec: LoraSpec) -> dict[str, tuple[int, int]]:
    """Native names of the adapted layers (no `.weight`) -> (out, in) features, in model order."""
    suffixes = {s for t in spec.targets for s in TARGET_NAMES[t]}
    pattern = re.compile(rf"({'|'.join(re.escape(TOWER_NAMES[t]) for t in spec.towers)})\.\d+\.(.+)\.weight")
    out = {}
    for name, shape in param_shapes(cfg).items():
        m = pattern.fullmatch(name)
        if m and m.group(2) in suffixes:
            out[name[: -len(".weight")]] = (shape[0], shape[1])
    if not out:
        raise LoraError(f"lora.targets {list(spec.targets)} match no linear layer of tower(s) {list(spec.towers)}")
    return out


def adapter_shapes(cfg: ThinkerConfig, spec: LoraSpec) -> Shapes:
    """Every adapter tensor's name and full shape: `<layer>.lora_A` (r, in), `<layer>.lora_B` (out, r)."""
    shapes: Shapes = {}
    for layer, (n_out, n_in) in lora_layers(cfg, spec).items():
        shapes[layer + ".lora_A"] = (spec.r, n_in)
        shapes[layer + ".lora_B"] = (n_out, spec.r)
    return shapes


def init_adapters(cfg: ThinkerConfig, spec: LoraSpec, *, seed: int, device: torch.device | str = "cpu") -> Params:
    """PEFT's default init, in fp32: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)),
    B = 0, so the adapted model starts equal to the base. Seeded CPU draws, then moved."""
    gen = torch.Generator().manual_seed(seed)
    out: Params = {}
    for name, shape in adapter_shapes(cfg, spec).items():
        if name.endswith(".lora_A"):
            bound = 1.0 / math.sqrt(shape[1])
            t = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        else:
            t = torch.zeros(shape, dtype=torch.float32)
        out[name] = t.to(device)
    return out


def layer_of(name: str) -> str:
    """`text.layers.0.attn.q.lora_A` -> `text.layers.0.attn.q`."""
    layer, half = name.rsplit(".", 1)
    if half not in ("lora_A", "lora_B"):
        raise LoraError(f"{name!r} is not an adapter tensor name (<layer>.lora_A / <layer>.lora_B)")
    return layer


def adapter_rule(name: str, plans: Mapping[str, TPPlan]) -> Split | None:
    """The TP split of an adapter tensor, from its base weight's rule: B follows a column split
    (dim 0, same units), A a row split (dim 1); the other half is replicated."""
    base = rule_for(layer_of(name) + ".weight", plans[tower_of(name)])
    if base is None:
        return None
    if name.endswith(".lora_B"):
        return base if base.dim == 0 else None
    return base if base.dim == 1 else None


def adapter_tp_plan(cfg: ThinkerConfig, spec: LoraSpec) -> TPPlan:
    """A TP plan (exact names) for the adapters, usable with omnicore.layout's shard / unshard."""
    plans = tp_plans(cfg)
    return tuple((re.escape(n), adapter_rule(n, plans)) for n in adapter_shapes(cfg, spec))


def replicated_half(name: str, plans: Mapping[str, TPPlan]) -> bool:
    """Whether this adapter tensor is the replicated half of a split base layer: under TP its local
    gradient is then this rank's part of a sum over the group (its partner's other slices)."""
    base = rule_for(layer_of(name) + ".weight", plans[tower_of(name)])
    return base is not None and adapter_rule(name, plans) is None


def _unwrap(x):
    if isinstance(x, LoraWeight):
        return x.lora_base
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + bias + scale * (x A^T) B^T as one autograd node (no dropout, one dtype): the
    adapter's product is fused into the base output (addmm), and backward adds the adapter's input
    gradient into the base's in place and skips every gradient not asked for (the frozen W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        x2 = x.reshape(-1, x.shape[-1])  # (..., in) -> (N, in)
        u = x2 @ a.T  # (N, r)
        y = x2 @ weight.T if bias is None else torch.addmm(bias, x2, weight.T)
        y.addmm_(u, b.T, alpha=scale)  # in place: y is this function's own temporary
        ctx.save_for_backward(x2, weight, a, b, u)
        ctx.scale, ctx.shape = scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, a, b, u = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gu = (g @ b).mul_(ctx.scale)  # (N, r): the gradient at u
        dx = dw = dbias = da = db = None
        if ctx.needs_input_grad[0]:
            dx = (g @ weight).addmm_(gu, a).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            dw = g.T @ x2
        if ctx.needs_input_grad[2]:
            dbias = g.sum(0)
        if ctx.needs_input_grad[3]:
            da = gu.T @ x2
        if ctx.needs_input_grad[4]:
            db = (g.T @ u).mul_(ctx.scale)
        return dx, dw, dbias, da, db, None


class LoraWeight(torch.Tensor):
    """A frozen base weight (sharing its storage) that carries a low-rank adapter.

    `F.linear(x, w, b)` with such a `w` computes the base output plus the adapter's; any other
    use sees the plain base weight (shapes, dtype, `.to`, slicing), so the model code that reads
    sizes from weights is unchanged. The adapter tensors are referenced, not copied: optimizer
    updates in place are seen by the next forward.
    """

    lora_base: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_scale: float
    lora_dropout: float

    @staticmethod
    def __new__(cls, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float = 0.0):
        out = torch.Tensor._make_subclass(cls, base.detach(), False)
        out.lora_base, out.lora_a, out.lora_b, out.lora_scale, out.lora_dropout = base, a, b, scale, dropout
        return out

    def adapted_linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) -> (..., out): base linear plus scale * B A dropout(x). Dropout masks come from
        torch's default generator, which the runtime seeds alike on every rank (activation recompute
        replays them)."""
        a, b = self.lora_a, self.lora_b
        if not self.lora_dropout and x.dtype == self.lora_base.dtype == a.dtype == b.dtype and not torch.is_autocast_enabled(x.device.type):
            return _LoraLinear.apply(x, self.lora_base, bias, a, b, self.lora_scale)
        y = F.linear(x, self.lora_base, bias)
        h = x.to(a.dtype)
        if self.lora_dropout:
            h = F.dropout(h, self.lora_dropout, training=True)
        return y + (F.linear(F.linear(h, a), b) * self.lora_scale).to(y.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], LoraWeight) and not isinstance(args[0], LoraWeight):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return args[1].adapted_linear(args[0], bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*_unwrap(args), **_unwrap(kwargs))

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"LoraWeight(base {tuple(self.lora_base.shape)} {self.lora_base.dtype}, r {self.lora_a.shape[0]}, scale {self.lora_scale})"


def _check_adapters(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor]) -> list[str]:
    """The adapted layers present in `base` (a TP shard or PP stage may hold a subset), checked."""
    layers = list(dict.fromkeys(layer_of(n) for n in adapters))
    for layer in layers:
        w = base.get(layer + ".weight")
        a, b = adapters.get(layer + ".lora_A"), adapters.get(layer + ".lora_B")
        if a is None or b is None:
            raise LoraError(f"adapter of {layer} is incomplete: it needs both lora_A and lora_B")
        if w is None:
            raise LoraError(f"adapter {layer} has no base weight {layer}.weight")
        if a.shape[0] != b.shape[1] or w.shape != (b.shape[0], a.shape[1]):
            raise LoraError(f"adapter {layer}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the base weight {tuple(w.shape)}")
    return layers


def adapted(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], spec: LoraSpec, *, train: bool = False) -> Params:
    """The parameter dict the model functions take: `base` with every adapted layer's weight a
    `LoraWeight` (dropout only when `train`). Built once; it follows in-place adapter updates."""
    out = dict(base)
    for layer in _check_adapters(base, adapters):
        name = layer + ".weight"
        out[name] = LoraWeight(base[name], adapters[layer + ".lora_A"], adapters[layer + ".lora_B"], spec.scale,
                               spec.dropout if train else 0.0)  # fmt: skip
    return out


@torch.no_grad()
def merge(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], spec: LoraSpec) -> Params:
    """Plain weights W + scale * B A, computed in fp32 and stored in each base weight's dtype
    (works on matching TP shards too: B A of the local halves is the local block of the product)."""
    out = dict(base)
    for layer in _check_adapters(base, adapters):
        name = layer + ".weight"
        w = base[name]
        a, b = adapters[layer + ".lora_A"], adapters[layer + ".lora_B"]
        delta = (b.float() @ a.float()) * spec.scale
        out[name] = (w.float() + delta.to(w.device)).to(w.dtype)
    return out
