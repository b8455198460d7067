"""omnicore.ops.cuda: the flash-attn wrapper's arguments (emulated, as documented) and, on a GPU, every op vs ref.

The `cuda`-marked tests need a CUDA device and skip here. The flash-attn test runs anywhere: a
stand-in `flash_attn` module computes what `flash_attn_varlen_func` is documented to compute
(per-segment attention from int32 cu_seqlens, softmax_scale None = 1/sqrt(D), causal aligned
bottom-right, GQA by contiguous head groups) - as documented, not run on hardware.
Tolerances: fp32 atol 2e-6; bf16 / fp16 atol 2e-2 plus rtol 2^-7 (elementwise ops).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from op_checks import RTOL_BF16, qkv, report, rope_tables

from omnicore import ops
from omnicore.ops import Segments, cuda, ref

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: (2e-6, 0.0), torch.bfloat16: (2e-2, RTOL_BF16), torch.float16: (2e-2, RTOL_BF16)}


def _flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                            softmax_scale=None, causal=False):  # fmt: skip
    """The documented semantics of flash-attn 2's varlen entry point, checked strictly."""
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype, "fp16 / bf16 only"
    assert q.shape[-1] <= 256 and q.shape[1] % k.shape[1] == 0, "head dim <= 256; H a multiple of Hkv"
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and cu_seqlens_q[0] == 0, "int32 cu_seqlens from 0"
    assert dropout_p == 0.0
    bounds = list(zip(cu_seqlens_q.tolist(), cu_seqlens_q.tolist()[1:], cu_seqlens_k.tolist(), cu_seqlens_k.tolist()[1:]))
    assert max_seqlen_q == max(b - a for a, b, _, _ in bounds) and max_seqlen_k == max(d - c for _, _, c, d in bounds)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    out = []
    for a, b, c, d in bounds:
        keys, values = (t[c:d].float().repeat_interleave(group, dim=1) for t in (k, v))
        scores = scale * torch.einsum("ihd,jhd->hij", q[a:b].float(), keys)
        if causal:  # bottom-right aligned: query i sees keys j <= i + (Skv - Sq)
            keep = torch.ones(b - a, d - c, dtype=torch.bool).tril(d - c - (b - a))
            scores = scores.masked_fill(~keep, float("-inf"))
        out.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), values))
    return torch.cat(out).to(q.dtype)


@pytest.mark.as_documented
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flash_attn_varlen_arguments_as_documented(monkeypatch, causal):
    calls = []
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = lambda *a, **kw: calls.append((a, kw)) or _flash_attn_varlen_func(*a, **kw)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    assert ops.resolve("cuda") is ops.CUDA_FLASH
    lengths = [1, 2, 3, 5, 8, 13, 21]
    q, k, v = qkv(sum(lengths), 6, 2, 16, torch.bfloat16)
    seg = Segments.from_lengths(lengths)
    report(cuda.attention(q, k, v, seg, causal=causal), ref.attention(q, k, v, seg, causal=causal), 2e-2)
    ((args, kwargs),) = calls
    assert args[3].tolist() == [0, 1, 3, 6, 11, 19, 32, 53] and args[5:7] == (21, 21)
    assert kwargs == {"dropout_p": 0.0, "softmax_scale": None, "causal": causal}
    # fp32 is outside flash-attn's dtypes: the SDPA path, no call.
    q32, k32, v32 = (t.float() for t in (q, k, v))
    report(cuda.attention(q32, k32, v32, seg, causal=causal), ref.attention(q32, k32, v32, seg, causal=causal), 2e-6)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("lengths,heads,kv_heads", [([37], 4, 4), ([1, 2, 3, 5, 8, 13, 21], 4, 2), ([64] * 5 + [16, 48], 16, 16)])
@pytest.mark.cuda
@needs_cuda
def test_cuda_attention_matches_reference(lengths, heads, kv_heads, causal, dtype):
    backend = ops.resolve("auto", "cuda")
    q, k, v = (t.cuda() for t in qkv(sum(lengths), heads, kv_heads, 64, dtype))
    seg = Segments.from_lengths(lengths, device="cuda")
    report(backend.attention(q, k, v, seg, causal=causal).cpu(), ref.attention(q, k, v, seg, causal=causal).cpu(), TOL[dtype][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.cuda
@needs_cuda
def test_cuda_elementwise_ops_and_gradients_match_reference(dtype):
    backend = ops.resolve("auto", "cuda")
    x = qkv(33, 4, 4, 64, dtype)[0].cuda().requires_grad_()
    cos, sin = (t.cuda() for t in rope_tables(33, 64))
    w = torch.randn(64, device="cuda").to(dtype)
    for name, fn in {
        "rope": lambda o: o.apply_rope(x, cos.to(dtype), sin.to(dtype)),
        "rope fp32 tables": lambda o: o.apply_rope(x, cos, sin),
        "rms_norm": lambda o: o.rms_norm(x, w, 1e-6),
        "swiglu": lambda o: o.swiglu(x, x * 2),
    }.items():
        got, want = fn(backend), fn(ops.REF)
        report(got.detach().cpu(), want.detach().cpu(), *TOL[dtype])
        (g_got,), (g_want,) = (torch.autograd.grad(y.float().pow(2).sum(), x) for y in (got, want))
        report(g_got.cpu(), g_want.cpu(), 50 * TOL[dtype][0], 2 * TOL[dtype][1])

