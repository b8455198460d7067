"""A readable emulation of the torch_npu fused kernels omnicore calls, as documented (torch_npu 2.14.0).

As documented, not run on hardware: every rule is read from the kernels' documentation as
summarised in the project's npu_ops.md reference (sections 2-5 and 7), not observed on an Ascend
device. The emulation computes the documented math (attention in fp32, as the reference) and
*rejects* documented misuse - a wrong layout, mask, sequence list, dtype or shape - so a wrapper
that passes wrong arguments fails loudly instead of matching by luck. Only what omnicore uses is
emulated; other features raise NotImplementedError. `make()` returns a fresh module that records
every call in `calls` as (name, args, kwargs); tests put it in sys.modules["torch_npu"].
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

__all__ = ["make", "COMPRESSED_MASK", "KernelArgumentError"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UNSET = 2147483647  # the documented default of pre_tockens / next_tockens
# Modes 2 / 3 take this exact mask; the kernel builds each sequence's triangle from the mode.
COMPRESSED_MASK = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
_TND_MAX_SEQS = 1024  # "at most 1K in varlen" (the v1 docstring's smaller figure)


class KernelArgumentError(ValueError):
    """The call breaks a documented constraint of the kernel."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KernelArgumentError(message)


def make() -> types.ModuleType:
    """A fresh fake `torch_npu` module whose `calls` list records (name, args, kwargs) per call."""
    module = types.ModuleType("torch_npu")
    module.calls = []

    def recorded(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            module.calls.append((fn.__name__, args, kwargs))
            return fn(*args, **kwargs)

        return call

    for fn in (npu_fusion_attention, npu_rotary_mul, npu_rms_norm, npu_swiglu):
        setattr(module, fn.__name__, recorded(fn))
    return module


def npu_fusion_attention(
    query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None, scale=1.0,
    keep_prob=1.0, pre_tockens=_UNSET, next_tockens=_UNSET, inner_precise=0, prefix=None,
    actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
    softmax_layout="", sink=None,
):  # fmt: skip
    """y = softmax(mask(scale * Q K^T)) V per batch element (BSND / BNSD) or per packed sequence (TND).

    Returns (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels) like the
    registered schema: out in the query's layout and dtype, the row max and exp-sum in fp32
    repeated over 8 lanes ([B, N, S, 8], or [T, N, 8] for TND), an empty softmax_out, zeros for the
    dropout seed / offset / numels (keep_prob = 1). Emulated masks: none (full attention; the
    documented rule is that sparse_mode, pre_tockens and next_tockens are then ignored) and the
    compressed 2048 x 2048 mask with sparse_mode 2 (j <= i) or 3 (j <= i + Skv - Sq).
    """
    _check(query.dtype in DTYPES and key.dtype == query.dtype == value.dtype, "q, k, v: one of fp16 / bf16 / fp32, all equal")
    if pse is not None or padding_mask is not None or prefix is not None or sink is not None:
        raise NotImplementedError("pse / padding_mask / prefix / sink are not emulated")
    if keep_prob != 1.0:
        raise NotImplementedError("dropout is not reproducible off-device (Philox stream undocumented)")
    _check(0 <= sparse_mode <= 8, f"sparse_mode must be 0..8, got {sparse_mode}")
    problems, assemble = _problems(query, key, value, input_layout, actual_seq_qlen, actual_seq_kvlen)
    head_axis = 1 if input_layout == "BNSD" else -2  # BSND / TND keep heads second to last
    n_heads, n_kv_heads, head_dim = query.shape[head_axis], key.shape[head_axis], query.shape[-1]
    _check(head_num == n_heads, f"head_num ({head_num}) must be the number of query heads ({n_heads})")
    _check(1 <= n_heads <= 256 and n_heads % n_kv_heads == 0, "query heads 1..256, a multiple of the kv heads")
    _check(1 <= head_dim <= 768 and key.shape[-1] == head_dim, "head dim 1..768, equal for q and k")
    if atten_mask is not None:
        if sparse_mode not in (2, 3):
            raise NotImplementedError(f"sparse_mode {sparse_mode} with a mask is not emulated")
        _check(atten_mask.dtype in (torch.bool, torch.uint8), "atten_mask must be bool or uint8")
        _check(
            atten_mask.shape == COMPRESSED_MASK.shape and torch.equal(atten_mask.cpu().bool(), COMPRESSED_MASK),
            "sparse_mode 2 / 3 need the compressed mask triu(ones(2048, 2048), 1)",
        )
    results = [_attend(q, k, v, scale, None if atten_mask is None else sparse_mode) for q, k, v in problems]
    out, row_max, row_sum = assemble(results)
    return out.to(query.dtype), row_max, row_sum, query.new_empty(0), 0, 0, 0


def _problems(query, key, value, layout, seq_q, seq_kv):
    """Split into per-problem (q (Sq, N, D), k, v (Skv, Nkv, D)) and a function that reassembles the outputs."""
    if layout in ("BSND", "BNSD"):
        _check(query.dim() == key.dim() == value.dim() == 4, f"{layout} needs 4-D q, k, v")
        _check(seq_q is None and seq_kv is None, "actual_seq_qlen / kvlen belong to TND")
        to_bsnd = (lambda t: t) if layout == "BSND" else (lambda t: t.transpose(1, 2))
        q, k, v = (to_bsnd(t) for t in (query, key, value))
        _check(q.shape[0] == k.shape[0] == v.shape[0] and k.shape == v.shape, "batch sizes and k / v shapes must agree")

        def assemble(results):
            out = to_bsnd(torch.stack([r[0] for r in results]))  # (B, S, N, D) -> the input layout
            # Per-row stats (N, S, 1) per batch element -> (B, N, S, 8).
            return out, *(torch.stack([r[i] for r in results]).expand(-1, -1, -1, 8) for i in (1, 2))

        return list(zip(q, k, v)), assemble
    if layout == "TND":
        _check(query.dim() == key.dim() == value.dim() == 3, "TND needs 3-D q, k, v")
        q_lengths = _lengths(seq_q, query.shape[0], "actual_seq_qlen")
        kv_lengths = _lengths(seq_kv, key.shape[0], "actual_seq_kvlen")
        _check(len(q_lengths) == len(kv_lengths), "actual_seq_qlen and actual_seq_kvlen must have the same count")
        _check(sum(q_lengths) == query.shape[0], "every query row must belong to a sequence (uncovered rows are undefined)")
        _check(all(kv > 0 or q == 0 for q, kv in zip(q_lengths, kv_lengths)), "Sq > 0 with Skv = 0 is not supported")
        pairs = [(q, kv) for q, kv in zip(q_lengths, kv_lengths) if q > 0]
        q_parts = query.split([q for q, _ in pairs])
        kv_sizes = [kv for _, kv in pairs] + [key.shape[0] - sum(kv for _, kv in pairs)]
        k_parts, v_parts = key.split(kv_sizes)[:-1], value.split(kv_sizes)[:-1]

        def assemble(results):
            out = torch.cat([r[0] for r in results])
            # Per-row stats (N, Sq, 1) -> (Sq, N, 8), then concatenated over sequences: [T, N, 8].
            stats = [torch.cat([r[i].transpose(0, 1).expand(-1, -1, 8) for r in results]) for i in (1, 2)]
            return out, *stats

        return list(zip(q_parts, k_parts, v_parts)), assemble
    raise NotImplementedError(f"input_layout {layout!r} is not emulated (BSH / SBH are not used by omnicore)")


def _lengths(ends, total: int, name: str) -> list[int]:
    """Per-sequence lengths from a documented cumulative list: host ints, trailing zeros = unused slots."""
    _check(isinstance(ends, (list, tuple)) and all(type(e) is int for e in ends), f"{name} must be a list of host ints")
    ends = list(ends)
    while ends and ends[-1] == 0:
        ends.pop()
    _check(0 < len(ends) <= _TND_MAX_SEQS, f"{name}: 1..{_TND_MAX_SEQS} sequences, got {len(ends)}")
    _check(all(b >= a for a, b in zip([0, *ends], ends)) and ends[-1] <= total, f"{name} must be cumulative and end <= T")
    return [b - a for a, b in zip([0, *ends], ends)]


def _attend(q, k, v, scale, sparse_mode):
    """One problem: q (Sq, N, D), k / v (Skv, Nkv, D) -> out (Sq, N, D), row max and exp-sum (N, Sq, 1) fp32."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))  # query head h reads kv head h // group
    scores = scale * torch.einsum("ihd,jhd->hij", q.float(), k)
    if sparse_mode is not None:
        n_q, n_kv = scores.shape[-2:]
        _check(sparse_mode == 2 or n_q <= n_kv, "sparse_mode 3 needs Sq <= Skv")
        shift = 0 if sparse_mode == 2 else n_kv - n_q  # 2: top-left diagonal; 3: bottom-right
        keep = torch.ones(n_q, n_kv, dtype=torch.bool, device=q.device).tril(shift)
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    weights = (scores - row_max).exp()
    row_sum = weights.sum(-1, keepdim=True)
    return torch.einsum("hij,jhd->ihd", weights / row_sum, v), row_max, row_sum


def npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None):
    """out = input * r1 + rotate_half(input) * r2 for a 4-D input (BNSD / BSND / SBND), in the input's dtype.

    Checks the documented limits: D even and < 896; r1 / r2 one of the half-mode broadcast shapes
    (11SD, B1SD, BNSD for BNSD; 1S1D, BS1D, BSND for BSND; S11D, SB1D, SBND for SBND) with values in
    [-1, 1]. Mixing dtypes is not documented, so the emulation demands r1 / r2 in the input's dtype.
    The wheel's decomposition computes in the input dtype; so does this.
    """
    if rotary_mode != "half" or rotate is not None:
        raise NotImplementedError("only rotary_mode='half' without `rotate` is emulated")
    _check(input.dim() == 4, f"input must be 4-D (BNSD, BSND or SBND), got {input.dim()}-D")
    a, b, c, d = input.shape
    _check(d % 2 == 0 and d < 896, f"head dim must be even and < 896, got {d}")
    _check(input.dtype in DTYPES and r1.dtype == r2.dtype == input.dtype, "input, r1, r2: one of fp16 / bf16 / fp32, all equal")
    allowed = {(1, 1, c, d), (a, 1, c, d), (a, b, c, d), (1, b, 1, d), (a, b, 1, d), (a, 1, 1, d)}
    shape = tuple(r1.shape)
    _check(shape == tuple(r2.shape) and shape in allowed, f"r1 / r2 shape {shape} not allowed for input {tuple(input.shape)}")
    _check(bool((r1.abs() <= 1).all() and (r2.abs() <= 1).all()), "r1 / r2 values must lie in [-1, 1]")
    x1, x2 = input.chunk(2, dim=-1)
    return input * r1 + torch.cat((-x2, x1), dim=-1) * r2


def npu_rms_norm(input, gamma, epsilon=1e-6):
    """(y, rstd): rstd = rsqrt(mean(x^2) + eps) over gamma's dims in fp32, y = (x * rstd * gamma) cast to x's dtype."""
    _check(input.dtype in DTYPES and gamma.dtype == input.dtype, "input and gamma: one of fp16 / bf16 / fp32, equal")
    _check(2 <= input.dim() <= 8, f"input must have 2..8 dims, got {input.dim()}")
    _check(tuple(gamma.shape) == tuple(input.shape[input.dim() - gamma.dim() :]), "gamma must match input's trailing dims")
    dims = tuple(range(-gamma.dim(), 0))
    x32 = input.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dims, keepdim=True) + epsilon)
    return (x32 * rstd * gamma.float()).to(input.dtype), rstd


def npu_swiglu(input, dim=-1):
    """silu(first half) * second half along `dim`; internal precision is undocumented, emulated in fp32."""
    _check(input.dtype in DTYPES and 1 <= input.dim() <= 8, "input: fp16 / bf16 / fp32 with 1..8 dims")
    _check(input.shape[dim] % 2 == 0, f"size along dim {dim} must be even, got {input.shape[dim]}")
    gate, up = input.float().chunk(2, dim=dim)
    return (F.silu(gate) * up).to(input.dtype)
