"""Ascend NPU backend: torch_npu's fused kernels behind the reference signatures.

torch_npu is an optional extra (`pip install omnicore[npu]`), imported inside the functions that
call it, never when omnicore is imported. Each wrapper converts our token-major layouts to the
kernel's and falls back to the portable path (`omnicore.ops.cpu`: SDPA / eager torch, which runs on
any device) for inputs outside the kernel's documented limits. The limits quoted in the docstrings
are torch_npu 2.14.0's documentation (docstrings, schemas and meta functions, collected in the
project's npu_ops.md reference); this module was tested against an emulation of those documented
semantics (tests/ops/fake_torch_npu.py), not on Ascend hardware.
"""

from __future__ import annotations

import functools
import itertools

import torch

from omnicore.ops import cpu
from omnicore.ops.segments import Segments

__all__ = ["require", "attention", "apply_rope", "rms_norm", "swiglu"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FA_MAX_HEAD_DIM = 768  # npu_fusion_attention: D in 1..768
_FA_MAX_HEADS = 256  # head_num (query heads) in 1..256
# TND sequence count per call: the v1 docstring says both 2K and "at most 1K in varlen"; stay
# inside the smaller figure and split longer lists (many vision windows of a long video).
_TND_MAX_SEQS = 1024
_COMPRESSED_MASK_SIZE = 2048
_ROTARY_MAX_HEAD_DIM = 896  # npu_rotary_mul: D even and < 896
_ROTARY_MAX_HEADS = 1000  # B, N < 1000 in half mode


def require() -> None:
    """Import torch_npu or fail with the command that installs it (called once, by `resolve`)."""
    try:
        import torch_npu  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "ops backend 'npu' needs torch_npu, which is not installed: pip install omnicore[npu] "
            "(torch_npu also needs the Ascend CANN runtime)"
        ) from err


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    *,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """`torch_npu.npu_fusion_attention` over packed segments: q (N, H, D), k / v (N, Hkv, D) -> (N, H, D).

    The kernel accepts fp16 / bf16 / fp32 (q, k, v the same dtype), D in 1..768, 1..256 query
    heads (`head_num`) with H a multiple of Hkv (query head j reads kv head j // (H / Hkv)), and
    `scale` defaulting to 1.0 (so 1/sqrt(D) is always passed here). Layouts used:
    - one segment length (a dense batch, uniform windows or chunks): "BSND", a free view
      (count, L, H, D) of the packed tokens, no sequence list;
    - mixed lengths: "TND" with `actual_seq_qlen = actual_seq_kvlen` = cumulative end offsets as
      host ints (taken from `segments.lengths`, so no device sync), at most 1024 sequences per call
      (longer lists are split into consecutive calls over contiguous token ranges).
    Causal is `sparse_mode=2` (top-left aligned, equal to 3 here since every segment has Sq == Skv)
    with the documented 2048 x 2048 compressed mask `triu(ones, 1)`; non-causal passes no mask
    (mode 0, full attention inside each sequence): windowed vision and chunked audio attention are
    just varlen. Other dtypes, head dims or head counts fall back to the SDPA path.
    """
    n_heads, head_dim = q.shape[1], q.shape[2]
    supported = (
        q.dtype in _KERNEL_DTYPES
        and k.dtype == q.dtype == v.dtype
        and head_dim <= _FA_MAX_HEAD_DIM
        and n_heads <= _FA_MAX_HEADS
        and q.shape[0] > 0
    )
    if not supported:
        return cpu.attention(q, k, v, segments, causal=causal, scale=scale)
    import torch_npu

    options = {
        "atten_mask": _compressed_causal_mask(q.device) if causal else None,
        "scale": head_dim**-0.5 if scale is None else scale,
        "keep_prob": 1.0,
        "sparse_mode": 2 if causal else 0,
    }
    if len(segments.buckets) == 1 and segments.buckets[0].index is None:
        count, length = segments.buckets[0].count, segments.buckets[0].length
        # (count * L, H, D) -> (count, L, H, D): BSND is a view of the packed tokens.
        q4, k4, v4 = (t.reshape(count, length, *t.shape[1:]) for t in (q, k, v))
        return torch_npu.npu_fusion_attention(q4, k4, v4, n_heads, "BSND", **options)[0].reshape(q.shape)
    parts = []
    for start, end, ends in _tnd_groups(segments.lengths):
        out = torch_npu.npu_fusion_attention(
            q[start:end], k[start:end], v[start:end], n_heads, "TND",
            actual_seq_qlen=ends, actual_seq_kvlen=ends, **options,
        )[0]  # fmt: skip
        parts.append(out)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _tnd_groups(lengths: tuple[int, ...]) -> list[tuple[int, int, list[int]]]:
    """Split segments into calls of <= 1024 sequences: (first token, end token, cumulative ends within the call)."""
    groups, start = [], 0
    for i in range(0, len(lengths), _TND_MAX_SEQS):
        # Cumulative end offsets without a leading 0, the documented form (lengths 2, 2 -> [2, 4]).
        ends = list(itertools.accumulate(lengths[i : i + _TND_MAX_SEQS]))
        groups.append((start, start + ends[-1], ends))
        start += ends[-1]
    return groups


@functools.lru_cache(maxsize=8)
def _compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The 2048 x 2048 bool mask sparse modes 2 / 3 require, True above the diagonal (= masked out).

    It carries no sequence information (the kernel derives each segment's triangle from the mode
    and the lengths), so one constant per device serves every layer and batch.
    """
    size = _COMPRESSED_MASK_SIZE
    return torch.ones(size, size, dtype=torch.bool, device=device).triu_(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`torch_npu.npu_rotary_mul` in half (rotate-half) mode: x (N, H, D), cos / sin (N, D) -> (N, H, D).

    The kernel takes a 4-D input (BNSD, BSND or SBND) with r1 = cos and r2 = sin broadcastable in
    the documented patterns (1S1D for BSND), D even and < 896, B and N < 1000, fp16 / bf16 / fp32,
    and returns x's dtype, computing out = x * r1 + rotate_half(x) * r2. Here x becomes BSND
    (1, N, H, D) and the tables 1S1D (1, N, 1, D), both views. It runs in the promoted dtype of x and
    the tables (vision: fp32 tables, so bf16 q / k are upcast first, as MindSpeed-MM does; text:
    activation-dtype tables), and the result is cast back to x's dtype. 1-D, 2-D (vision) and
    3-D (mrope) rotary differ only in how the tables were built, so all take this one call.
    Odd or too large D, too many heads, or other dtypes fall back to the eager path.
    """
    n_heads, head_dim = x.shape[1], x.shape[2]
    dtype = torch.promote_types(x.dtype, cos.dtype)
    supported = dtype in _KERNEL_DTYPES and head_dim % 2 == 0 and head_dim < _ROTARY_MAX_HEAD_DIM and n_heads < _ROTARY_MAX_HEADS
    if not supported:
        return cpu.apply_rope(x, cos, sin)
    import torch_npu

    # (N, H, D) -> (1, N, H, D) BSND; (N, D) -> (1, N, 1, D) 1S1D.
    x4 = x.to(dtype)[None]
    r1, r2 = (t.to(dtype)[None, :, None, :] for t in (cos, sin))
    out = torch_npu.npu_rotary_mul(x4, r1, r2, rotary_mode="half")  # one tensor, x4's shape and dtype
    return out[0].to(x.dtype)  # (1, N, H, D) -> (N, H, D)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`torch_npu.npu_rms_norm`: x (..., C), weight (C,) -> (..., C).

    The kernel takes x of 2..8 dims in fp16 / bf16 / fp32 and gamma of x's dtype shaped like x's
    trailing dims; it returns (y, rstd) with rstd fp32 and y = (x * rstd * gamma) cast to x's
    dtype. HF rounds x * rstd to x's dtype before multiplying by the weight, so in fp16 / bf16 the
    two can differ by one rounding (fp32: identical up to summation order); MindSpeed makes the same
    substitution. A weight of another dtype (the reference then returns the promoted dtype), 1-D x
    or other dtypes fall back to the eager path.
    """
    supported = x.dtype in _KERNEL_DTYPES and weight.dtype == x.dtype and 2 <= x.dim() <= 8
    if not supported:
        return cpu.rms_norm(x, weight, eps)
    import torch_npu

    return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`torch_npu.npu_swiglu`: silu(gate) * up for gate, up (..., F) -> (..., F).

    The kernel takes one tensor of 1..8 dims (fp16 / bf16 / fp32) and splits it in halves along
    `dim`, the first half being the gate: out = silu(x1) * x2. The towers compute gate and up with
    separate matmuls, so the wrapper concatenates them on the last dim (one copy, the layout
    conversion; MindSpeed-MM's FSDP path does the same). Mismatched shapes or dtypes, or other
    dtypes, fall back to the eager path.
    """
    supported = gate.dtype in _KERNEL_DTYPES and up.dtype == gate.dtype and up.shape == gate.shape and gate.dim() <= 8
    if not supported:
        return cpu.swiglu(gate, up)
    import torch_npu

    return torch_npu.npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)
