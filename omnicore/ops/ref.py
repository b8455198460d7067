"""Reference implementations of the hot ops: the readable specification every backend is tested against.

Numerics follow the Hugging Face Qwen2.5-Omni modules (transformers 4.52): softmax in fp32,
RMSNorm statistics in fp32 with the weight applied after casting back, rotary in the dtype of the
cos / sin tables (fp32 tables for the vision tower, activation-dtype tables for the text tower).
These favour clarity over speed: attention materialises the full (N, N) mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from omnicore.ops.segments import Segments

__all__ = ["attention", "cached_attention", "apply_rope", "rms_norm", "swiglu", "rotate_half"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    *,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-diagonal (optionally causal) attention over packed segments.

    q: (N, H, D); k, v: (N, Hkv, D) with H a multiple of Hkv (query head j reads kv head
    j // (H / Hkv)). Token i attends to token j iff both lie in the same segment and, when causal,
    j <= i. Returns (N, H, D) in q's dtype.
    """
    n_heads, n_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = n_heads // n_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    seg = segments.segment_ids()
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed = allowed & torch.ones_like(allowed).tril()
    scores = torch.einsum("ihd,jhd->hij", q.float(), k.float()) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.einsum("hij,jhd->ihd", probs, v).to(q.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the HF rotary pairing: dim j with j + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (N, H, D) by per-token angles; cos, sin: (N, D), shared by all heads.

    Computed in the promoted dtype of x and the tables, returned in x's dtype.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32 (HF Qwen2RMSNorm)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the gated MLP activation of the text and vision towers."""
    return F.silu(gate) * up


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lengths: Sequence[int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of a few new queries over a KV cache, aligned to the bottom-right corner.

    q: (B, S, H, D), the newest S tokens of every row; k, v: (B, L, Hkv, D), each row's cache with
    its first `kv_lengths[b]` slots valid (the S new tokens' keys already written last among them).
    Query i of row b sits at position kv_lengths[b] - S + i and attends keys 0 .. that position;
    slots past kv_lengths[b] are never read. Needs S <= kv_lengths[b] <= L. Returns (B, S, H, D).
    """
    s, n_heads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    group = n_heads // k.shape[2]
    out = []
    for b, n in enumerate(kv_lengths):
        keys = k[b, :n].repeat_interleave(group, dim=1)  # (n, H, D)
        values = v[b, :n].repeat_interleave(group, dim=1)
        query_pos = torch.arange(n - s, n, device=q.device)
        allowed = torch.arange(n, device=q.device)[None, :] <= query_pos[:, None]  # (S, n)
        scores = torch.einsum("ihd,jhd->hij", q[b].float(), keys.float()) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(values.dtype)
        out.append(torch.einsum("hij,jhd->ihd", probs, values).to(q.dtype))
    return torch.stack(out)
