"""CPU backend (also the portable fallback for any device): PyTorch SDPA over length buckets.

Packed segments of equal length are batched into one SDPA call, (count, L, H, D) viewed as
(count, H, L, D) without a copy (the CPU flash kernel reads that strided layout natively), so a
uniform batch is a single call with no mask at all, vision windows are one call for the full
windows plus one per ragged size, and audio chunks one call for the 2-second chunks plus the tails.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnicore.ops import ref
from omnicore.ops.segments import Segments

__all__ = ["attention", "apply_rope", "rms_norm", "swiglu"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    *,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as `ref.attention`: q (N, H, D), k / v (N, Hkv, D) -> (N, H, D)."""
    gqa = q.shape[1] != k.shape[1]
    if len(segments.buckets) == 1 and segments.buckets[0].index is None:
        bucket = segments.buckets[0]
        return _sdpa(q, k, v, bucket.count, bucket.length, causal, scale, gqa).reshape(q.shape)
    out = q.new_empty(q.shape)
    for bucket in segments.buckets:
        idx = bucket.index
        part = _sdpa(q[idx], k[idx], v[idx], bucket.count, bucket.length, causal, scale, gqa)
        out.index_copy_(0, idx, part.reshape(-1, *q.shape[1:]))
    return out


def _sdpa(q, k, v, count, length, causal, scale, gqa):
    # (count * L, H, D) -> (count, L, H, D) -> (count, H, L, D), a strided view, no copy.
    q, k, v = (t.reshape(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)  # (count, L, H, D)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """PyTorch's fused RMSNorm: one pass, fp32 statistics; bit-identical to the reference in fp32."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


apply_rope = ref.apply_rope
swiglu = ref.swiglu
