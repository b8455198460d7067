"""CPU backend (also the portable fallback for any device): SDPA over length buckets, lean elementwise ops.

Segments of one length are one SDPA call on a (count, H, L, D) strided view: a uniform batch is a
single call with no mask, vision windows one call per window size, audio chunks one for the full
chunks plus the tail; contiguous buckets are read through slices, scattered ones gathered. On CPU
tensors the buckets' forward and backward run as one autograd node (`_PackedFlash`).
Elementwise ops are memory bound and fresh temporaries cost page faults, so rotary and RMSNorm have
hand-written backwards that allocate little, inputs are cast once (a bf16 x fp32 broadcast takes a
slow path), and SwiGLU reuses its silu buffer when no gradient is needed. Measured in benches/.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from omnicore.ops import ref
from omnicore.ops.segments import LengthBucket, Segments

__all__ = ["attention", "sdpa_attention", "cached_attention", "apply_rope", "rms_norm", "swiglu"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    *,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as `ref.attention`: q (N, H, D), k / v (N, Hkv, D) -> (N, H, D).

    On CPU tensors, SDPA's flash kernel per bucket inside one autograd node (`_PackedFlash`); on
    other devices (the CUDA backend shares this function), `sdpa_attention`.
    """
    if q.device.type == "cpu":
        return _PackedFlash.apply(q, k, v, segments, causal, scale)
    return sdpa_attention(q, k, v, segments, causal=causal, scale=scale)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    *,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """`attention` on any device: one SDPA call per length bucket, through autograd."""
    gqa = q.shape[1] != k.shape[1]

    def sdpa(bucket: LengthBucket) -> torch.Tensor:  # (count, H, L, D)
        views = (_bucket_view(t, bucket) for t in (q, k, v))
        return F.scaled_dot_product_attention(*views, is_causal=causal, scale=scale, enable_gqa=gqa)

    if len(segments.buckets) == 1 and segments.buckets[0].index is None:
        return sdpa(segments.buckets[0]).transpose(1, 2).reshape(q.shape)
    out = q.new_empty(q.shape)
    for bucket in segments.buckets:
        _write(out, bucket, sdpa(bucket))
    return out


_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PackedFlash(torch.autograd.Function):
    """The CPU flash kernel (the one SDPA picks for these inputs; GQA native) over each length
    bucket, forward and backward as one autograd node.

    Through autograd, each bucket's slices of q / k / v would get their own backward nodes, each
    filling a zero tensor the size of the whole input and adding it in: three fills and adds per
    bucket and layer. Here every bucket's gradients are written once into one buffer per input; a
    single bucket covering all tokens is pure views.
    """

    @staticmethod
    def forward(ctx, q, k, v, segments, causal, scale):
        out, lses = None, []
        covered = segments.total == q.shape[0]  # always, for Segments built from cu_seqlens
        single = covered and len(segments.buckets) == 1 and segments.buckets[0].index is None
        if not single:
            out = q.new_empty(q.shape) if covered else q.new_zeros(q.shape)
        for bucket in segments.buckets:
            o, lse = _flash_forward(*(_bucket_view(t, bucket) for t in (q, k, v)), 0.0, causal, scale=scale)
            lses.append(lse)
            if single:
                out = o.transpose(1, 2).reshape(q.shape)  # the kernel writes (count, L, H, D): a view
            else:
                _write(out, bucket, o)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.buckets, ctx.causal, ctx.scale, ctx.covered = segments.buckets, causal, scale, covered
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, out, *lses = ctx.saved_tensors
        grads = [t.new_empty(t.shape) if ctx.covered else t.new_zeros(t.shape) for t in (q, k, v)]
        for bucket, lse in zip(ctx.buckets, lses):
            views = (_bucket_view(t, bucket) for t in (grad, q, k, v, out))
            for dst, part in zip(grads, _flash_backward(*views, lse, 0.0, ctx.causal, scale=ctx.scale)):
                _write(dst, bucket, part)
        return *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])), None, None, None


def _bucket_view(t: torch.Tensor, bucket: LengthBucket) -> torch.Tensor:
    """A bucket's tokens of t (N, H, D) as (count, H, L, D): a strided view, or a gather when scattered."""
    part = t[bucket.tokens] if bucket.index is None else t[bucket.index]
    return part.reshape(bucket.count, bucket.length, *t.shape[1:]).transpose(1, 2)


def _write(dst: torch.Tensor, bucket: LengthBucket, part: torch.Tensor) -> None:
    """Store a bucket's (count, H, L, D) result into its tokens of dst (N, H, D)."""
    rows = part.transpose(1, 2).reshape(-1, *dst.shape[1:])
    if bucket.index is None:
        dst[bucket.tokens] = rows
    else:
        dst.index_copy_(0, bucket.index, rows)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lengths: Sequence[int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as `ref.cached_attention`: q (B, S, H, D) over caches k / v (B, L, Hkv, D) -> (B, S, H, D).

    One SDPA call over the caches read up to the longest row (a view, no copy). A single new token
    per row with every row equally long (a lone prompt, the usual decode step) needs no mask;
    otherwise a boolean (B, 1, S, L) mask marks each query's keys, bottom-right aligned.
    """
    s = q.shape[1]
    longest = max(kv_lengths)
    # (B, S, H, D) -> (B, H, S, D); the caches likewise, cut to the slots any row uses.
    qh, kh, vh = q.transpose(1, 2), k[:, :longest].transpose(1, 2), v[:, :longest].transpose(1, 2)
    mask = None
    if s > 1 or any(n != longest for n in kv_lengths):
        lengths = torch.tensor(kv_lengths, device=q.device)
        query_pos = lengths[:, None] - s + torch.arange(s, device=q.device)  # (B, S)
        mask = (torch.arange(longest, device=q.device) <= query_pos[..., None])[:, None]  # (B, 1, S, L)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`ref.apply_rope` without the concatenation: x (N, H, D), cos / sin (N, D) -> (N, H, D).

    Tables that need a gradient (none do in the towers: they are built from positions) take the
    reference's autograd path. In bf16 the fused multiply-add rounds once where the reference rounds
    each product, so results may differ from it by one bf16 ulp (they are closer to the exact value).
    """
    if cos.requires_grad or sin.requires_grad:
        return ref.apply_rope(x, cos, sin)
    return _Rotary.apply(x, cos, sin)


class _Rotary(torch.autograd.Function):
    """out = x * cos + rotate_half(x) * sin, as one product and fused multiply-adds (`_rotate`).

    rotate_half pairs dim j with j + D/2: out[:h] = x[:h] cos[:h] - x[h:] sin[:h] and
    out[h:] = x[h:] cos[h:] + x[:h] sin[h:]. The backward is the transposed rotation,
    dx[:h] = g[:h] cos[:h] + g[h:] sin[h:], dx[h:] = g[h:] cos[h:] - g[:h] sin[:h].
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotate(x, cos, sin, sign=1.0).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1.0).to(ctx.x_dtype), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x * cos + R(x) * sin in the promoted dtype, R the rotation (sign +1) or its transpose (sign -1)."""
    half = x.shape[-1] // 2
    dtype = torch.promote_types(x.dtype, cos.dtype)
    # Cast once up front: a bf16 x fp32 broadcast multiply is many times slower than the cast.
    x = x.to(dtype)
    cos, sin = (t.to(dtype)[:, None, :] for t in (cos, sin))  # (N, 1, D): shared by all heads
    # The sign goes on a half of the (N, 1, D) table, not on the activations.
    if sign > 0:
        sin_first, sin_second = -sin[..., :half], sin[..., half:]
    else:
        sin_first, sin_second = sin[..., half:], -sin[..., :half]
    out = x * cos
    if x.element_size() >= 4:
        out[..., :half].addcmul_(x[..., half:], sin_first)
        out[..., half:].addcmul_(x[..., :half], sin_second)
        return out
    # 16-bit kernels pay per inner loop, and the half-width loops above are short: swap the halves
    # (one flip) and do a single full-width multiply-add (measured ~1.7x the reference in bf16
    # versus ~1.1x half-width; in fp32 the half-width form wins, ~3.5x versus ~2.7x).
    swapped = x.reshape(*x.shape[:-1], 2, half).flip(-2).reshape(x.shape)  # [x1, x2] -> [x2, x1]
    return out.addcmul_(swapped, torch.cat((sin_first, sin_second), dim=-1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`ref.rms_norm` (HF Qwen2RMSNorm, fp32 statistics) with one fused sum of squares and a hand-written backward."""
    return _RmsNorm.apply(x, weight, eps)


class _RmsNorm(torch.autograd.Function):
    """y = weight * (x * rstd).to(x.dtype), rstd = rsqrt(mean(x^2) + eps) in fp32.

    Saves x and rstd (..., 1) only; x_hat = x * rstd is recomputed in the backward, which is
    dx = rstd * (gw - x_hat * mean(gw * x_hat)) with gw = grad * weight, and dweight = sum(grad * x_hat),
    all in fp32 (the reference rounds gw and x_hat to x's dtype first: within two ulps in bf16).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        # vecdot sums the squares in one pass without materialising x^2.
        rstd = torch.linalg.vecdot(x32, x32).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        y = _mul_fresh(x32, x, rstd).to(x.dtype)
        # The weight multiplies after rounding to x's dtype, as in HF; in place when the dtype allows.
        return y.mul_(weight) if torch.result_type(y, weight) == y.dtype else y * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        width = x.shape[-1]
        x_hat = _mul_fresh(x.to(rstd.dtype), x, rstd)
        g32 = grad.to(rstd.dtype)
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = torch.linalg.vecdot(g32.reshape(-1, width), x_hat.reshape(-1, width), dim=0).to(weight.dtype)
        gw = _mul_fresh(g32, grad, weight.to(rstd.dtype))
        mean = torch.linalg.vecdot(gw, x_hat).unsqueeze(-1).div_(width)
        d_x = gw.sub_(x_hat.mul_(mean)).mul_(rstd)
        return d_x.to(x.dtype), d_weight, None


def _mul_fresh(t: torch.Tensor, source: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """t * factor, in place when t is a fresh copy of `source` (a dtype cast), never into the caller's tensor."""
    return t.mul_(factor) if t is not source else t * factor


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; without gradients the product is written into the silu buffer.

    With gradients this is the reference's silu * mul: autograd runs the same three kernels a
    hand-written backward would, and one saving an allocation measured 0.94-1.07x (bench_swiglu.py).
    """
    if gate.requires_grad or up.requires_grad or gate.shape != up.shape or gate.dtype != up.dtype:
        return ref.swiglu(gate, up)
    return F.silu(gate).mul_(up)
