"""CUDA backend: flash-attn's varlen kernel when the package is importable, SDPA otherwise.

Nothing here needs a source-built package. Without flash-attn, attention is the length-bucketed
SDPA path of `omnicore.ops.cpu` (on CUDA, SDPA picks its flash / memory-efficient kernels, and a
uniform batch is one call with no mask). With flash-attn (the optional `cuda` extra), packed
segments of any lengths are one `flash_attn_varlen_func` call over `cu_seqlens`, with no padding
and no per-length grouping. RMSNorm is PyTorch's fused CUDA kernel; rotary and SwiGLU are the
portable implementations. Checked on a GPU by benches/gpu_check.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnicore.ops import cpu
from omnicore.ops.segments import Segments

__all__ = ["flash_attn_available", "attention", "rms_norm"]

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


def flash_attn_available() -> bool:
    """Whether flash-attn imports here (checked once, by `resolve`, never at import of omnicore)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    *,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """`flash_attn_varlen_func` over packed segments: q (N, H, D), k / v (N, Hkv, D) -> (N, H, D).

    flash-attn takes fp16 / bf16, head dim <= 256, q (total, H, D) and k / v (total, Hkv, D)
    with H a multiple of Hkv (query head j reads kv head j // (H / Hkv), our contract), int32
    `cu_seqlens` starting at 0 and the longest segment length. Its causal mask is aligned to the
    bottom-right corner, which equals our top-left one because every segment attends to itself
    (Sq == Skv). fp32 inputs and larger head dims take the SDPA path.
    """
    supported = q.dtype in _FLASH_DTYPES and k.dtype == q.dtype == v.dtype and q.shape[-1] <= _FLASH_MAX_HEAD_DIM
    if not supported or q.shape[0] == 0:
        return cpu.attention(q, k, v, segments, causal=causal, scale=scale)
    from flash_attn import flash_attn_varlen_func

    cu = segments.cu_seqlens.to(device=q.device, dtype=torch.int32)  # a no-op when built on q's device
    longest = segments.max_len
    return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=0.0, softmax_scale=scale, causal=causal)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """PyTorch's fused RMSNorm (one CUDA kernel, fp32 statistics); equals `ref.rms_norm` to one rounding in fp16 / bf16."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)
