"""Every backend equals ops/ref.py; properties of the reference ops themselves (hypothesis).

Tolerances (max |diff|): fp32 2e-6 (values O(1)); bf16 2e-2 (one bf16 ulp near 1 is 7.8e-3; the
reference's fp32 softmax and SDPA's accumulate differently before the final rounding).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicore import ops
from omnicore.ops import Segments, ref

BACKENDS = [ops.CPU]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


def _qkv(n, heads, kv_heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads)]


def _report(got, want, tol):
    diff = (got.float() - want.float()).abs()
    assert diff.max() <= tol, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g} (tol {tol})"


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "lengths,heads,kv_heads",
    [
        ([37], 4, 4),  # one dense sequence
        ([1, 2, 3, 5, 8, 13, 21], 4, 2),  # varlen 1..N, GQA
        ([16] * 9 + [4, 12], 2, 2),  # vision-style windows: many full, a few ragged
        ([100, 100, 57], 4, 1),  # audio-style chunks, multi-query
    ],
)
def test_attention_matches_reference(backend, dtype, causal, lengths, heads, kv_heads):
    q, k, v = _qkv(sum(lengths), heads, kv_heads, 16, dtype)
    seg = Segments.from_lengths(lengths)
    _report(backend.attention(q, k, v, seg, causal=causal), ref.attention(q, k, v, seg, causal=causal), TOL[dtype])


@pytest.mark.parametrize("backend", [ops.REF, ops.CPU], ids=lambda b: b.name)
def test_packed_attention_equals_one_by_one(backend):
    lengths = [3, 11, 1, 7]
    q, k, v = _qkv(sum(lengths), 4, 2, 8, torch.float32, seed=3)
    packed = backend.attention(q, k, v, Segments.from_lengths(lengths), causal=True)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        alone = backend.attention(q[s], k[s], v[s], Segments.from_lengths([n]), causal=True)
        _report(packed[s], alone, 1e-6)
        start += n


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_backend_gradients_match_reference(backend):
    lengths = [5, 9, 9, 2]
    q, k, v = (t.requires_grad_() for t in _qkv(sum(lengths), 4, 2, 8, torch.float32, seed=1))
    seg = Segments.from_lengths(lengths)
    grads = [torch.autograd.grad(f(q, k, v, seg, causal=True).pow(2).sum(), (q, k, v)) for f in (ref.attention, backend.attention)]
    for want, got in zip(*grads):
        _report(got, want, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_elementwise_ops_match_reference(backend, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 4, 16, generator=g).to(dtype)
    cos, sin = torch.randn(33, 16, generator=g), torch.randn(33, 16, generator=g)
    _report(backend.apply_rope(x, cos.to(dtype), sin.to(dtype)), ref.apply_rope(x, cos.to(dtype), sin.to(dtype)), TOL[dtype])
    _report(backend.apply_rope(x, cos, sin), ref.apply_rope(x, cos, sin), TOL[dtype])
    w = torch.randn(16, generator=g).to(dtype)
    _report(backend.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), TOL[dtype])
    _report(backend.swiglu(x, x * 2), ref.swiglu(x, x * 2), TOL[dtype])


def test_segments_buckets_cover_every_token_once():
    seg = Segments.from_lengths([3, 0, 5, 3, 1, 5])
    assert seg.lengths == (3, 5, 3, 1, 5)  # empty segments dropped
    assert seg.cu_seqlens.tolist() == [0, 3, 8, 11, 12, 17]
    covered = torch.cat([b.index for b in seg.buckets])
    assert sorted(covered.tolist()) == list(range(17))
    assert {b.length: b.count for b in seg.buckets} == {1: 1, 3: 2, 5: 2}
    with pytest.raises(ValueError, match="never decrease"):
        Segments.from_cu_seqlens(torch.tensor([0, 5, 3]))


def _angles(positions, dim=16, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, dim // 2, dtype=torch.float64) * 2 / dim)
    a = positions[:, None].double() * inv
    a = torch.cat((a, a), -1)
    return a.cos(), a.sin()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**16), st.integers(-500, 500))
def test_rope_preserves_norm_and_depends_on_relative_offset(seed, shift):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 16, generator=g, dtype=torch.float64), torch.randn(2, 1, 16, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 1000, (2,), generator=g)
    cos, sin = _angles(pos)
    rq = ref.apply_rope(q, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1))
    cos2, sin2 = _angles(pos + shift)
    score = (rq[0] * ref.apply_rope(k, cos, sin)[1]).sum()
    shifted = (ref.apply_rope(q, cos2, sin2)[0] * ref.apply_rope(k, cos2, sin2)[1]).sum()
    assert torch.allclose(score, shifted)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 24), st.integers(0, 2**16))
def test_causal_attention_ignores_future_tokens(n, seed):
    q, k, v = _qkv(n, 2, 1, 8, torch.float32, seed=seed)
    cut = n // 2
    k2, v2 = k.clone(), v.clone()
    k2[cut:] += 5
    v2[cut:] -= 3
    seg = Segments.from_lengths([n])
    for backend in (ops.REF, ops.CPU):
        a = backend.attention(q, k, v, seg, causal=True)[:cut]
        b = backend.attention(q, k2, v2, seg, causal=True)[:cut]
        _report(a, b, 1e-6)


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-2, 1e3), st.integers(0, 2**16))
def test_rms_norm_is_scale_invariant(scale, seed):
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = torch.ones(32, dtype=torch.float64)
    assert torch.allclose(ref.rms_norm(x * scale, w, 0.0), ref.rms_norm(x, w, 0.0), atol=1e-6)


def test_resolve_names_backends():
    assert ops.resolve("ref") is ops.REF and ops.resolve("cpu") is ops.CPU
    assert ops.resolve("auto", "cpu") is ops.CPU
    with pytest.raises(ValueError, match="ops.backend must be one of"):
        ops.resolve("fast")
