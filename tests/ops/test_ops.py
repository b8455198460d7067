"""Every backend equals ops/ref.py; properties of the reference ops themselves (hypothesis); `resolve`.

Tolerances (|diff| <= atol + rtol * |want|): fp32 atol 2e-6 (values O(1)); bf16 atol 2e-2 (one
bf16 ulp near 1 is 7.8e-3; the reference's fp32 softmax and SDPA's accumulate differently before
the final rounding) plus rtol 2^-7 (one bf16 ulp of the value) for the elementwise ops, whose
fused multiply-adds round once where the reference rounds each product.
"""

from __future__ import annotations

import sys

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from op_checks import RTOL_BF16, qkv, report

from omnicore import ops
from omnicore.ops import Segments, cpu, ref

# CUDA without flash-attn shares the CPU backend's attention, which takes its SDPA-per-bucket path
# (`cpu.sdpa_attention`) on non-CPU tensors: that path is checked here on CPU tensors as "sdpa".
BACKENDS = [ops.CPU, ops.CUDA, attrs.evolve(ops.CUDA, name="sdpa", attention=cpu.sdpa_attention)]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}
RTOL = {torch.float32: 0.0, torch.bfloat16: RTOL_BF16}


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
        ([5, 9, 5, 9, 3], 2, 1),  # same-length segments apart: gathered, not sliced
    ],
)
def test_attention_matches_reference(backend, dtype, causal, lengths, heads, kv_heads):
    q, k, v = qkv(sum(lengths), heads, kv_heads, 16, dtype)
    seg = Segments.from_lengths(lengths)
    report(backend.attention(q, k, v, seg, causal=causal), ref.attention(q, k, v, seg, causal=causal), TOL[dtype])


@pytest.mark.parametrize("backend", [ops.REF, ops.CPU], ids=lambda b: b.name)
def test_packed_attention_equals_one_by_one(backend):
    lengths = [3, 11, 1, 7]
    q, k, v = qkv(sum(lengths), 4, 2, 8, torch.float32, seed=3)
    packed = backend.attention(q, k, v, Segments.from_lengths(lengths), causal=True)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        alone = backend.attention(q[s], k[s], v[s], Segments.from_lengths([n]), causal=True)
        report(packed[s], alone, 1e-6)
        start += n


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "lengths",
    [[5, 9, 9, 2], [12], [4, 4, 4], [5, 9, 5, 2, 9, 1]],
    ids=["sliced-buckets", "one-sequence", "uniform", "gathered-buckets"],
)
def test_backend_gradients_match_reference(backend, causal, lengths):
    q, k, v = (t.requires_grad_() for t in qkv(sum(lengths), 4, 2, 8, torch.float32, seed=1))
    seg = Segments.from_lengths(lengths)
    grads = [torch.autograd.grad(f(q, k, v, seg, causal=causal).pow(2).sum(), (q, k, v)) for f in (ref.attention, backend.attention)]
    for want, got in zip(*grads):
        report(got, want, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_elementwise_ops_match_reference(backend, dtype):
    """Text rotary (activation-dtype tables), vision rotary (fp32 tables), RMSNorm, SwiGLU; tolerances above."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 4, 16, generator=g).to(dtype)
    cos, sin = torch.randn(33, 16, generator=g), torch.randn(33, 16, generator=g)
    tol, rtol = TOL[dtype], RTOL[dtype]
    report(backend.apply_rope(x, cos.to(dtype), sin.to(dtype)), ref.apply_rope(x, cos.to(dtype), sin.to(dtype)), tol, rtol)
    report(backend.apply_rope(x, cos, sin), ref.apply_rope(x, cos, sin), tol, rtol)
    assert backend.apply_rope(x, cos, sin).dtype == dtype
    w = torch.randn(16, generator=g).to(dtype)
    report(backend.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), tol, rtol)
    report(backend.swiglu(x, x * 2), ref.swiglu(x, x * 2), tol, rtol)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_elementwise_gradients_match_reference(backend, dtype):
    """d/dx of rotary (both table dtypes), d/dx and d/dweight of RMSNorm, d/dgate and d/dup of SwiGLU.

    fp32 atol 1e-5, rtol 1e-6 (gradients sum a few O(1) terms); bf16 atol 5e-2 plus rtol 2^-6 (two bf16
    roundings: the reference's backward rounds each product, the fused backwards round once).
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 3, 16, generator=g).to(dtype).requires_grad_()
    out_grad = torch.randn(9, 3, 16, generator=g).to(dtype)
    tol, rtol = (1e-5, 1e-6) if dtype == torch.float32 else (5e-2, 2 * RTOL_BF16)
    w = torch.randn(16, generator=g).to(dtype).requires_grad_()
    up = torch.randn(9, 3, 16, generator=g).to(dtype).requires_grad_()
    cos, sin = torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g)
    cases = {
        "rope": (lambda o: o.apply_rope(x, cos.to(dtype), sin.to(dtype)), (x,)),
        "rope fp32 tables": (lambda o: o.apply_rope(x, cos, sin), (x,)),
        "rms_norm": (lambda o: o.rms_norm(x, w, 1e-6), (x, w)),
        "swiglu": (lambda o: o.swiglu(x, up), (x, up)),
    }
    for name, (fn, inputs) in cases.items():
        want = torch.autograd.grad(fn(ops.REF), inputs, out_grad)
        got = torch.autograd.grad(fn(backend), inputs, out_grad)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype, name
            report(a, b, tol, rtol)


@pytest.mark.parametrize("op", ["apply_rope", "rms_norm", "swiglu"])
def test_cpu_backwards_pass_gradcheck(op):
    """float64 finite differences against the hand-written backwards (gradcheck also reuses the graph)."""
    g = torch.Generator().manual_seed(5)
    x, up = (torch.randn(6, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    fn, inputs = {
        "apply_rope": (lambda x: ops.CPU.apply_rope(x, cos, sin), (x,)),
        "rms_norm": (lambda x, w: ops.CPU.rms_norm(x, w, 1e-6), (x, w)),
        "swiglu": (ops.CPU.swiglu, (x, up)),
    }[op]
    assert torch.autograd.gradcheck(fn, inputs)


def test_segments_buckets_cover_every_token_once():
    seg = Segments.from_lengths([3, 0, 5, 3, 1, 5])
    assert seg.lengths == (3, 5, 3, 1, 5)  # empty segments dropped
    assert seg.cu_seqlens.tolist() == [0, 3, 8, 11, 12, 17]
    covered = torch.cat([torch.arange(17)[b.tokens] if b.index is None else b.index for b in seg.buckets])
    assert sorted(covered.tolist()) == list(range(17))
    assert {b.length: b.count for b in seg.buckets} == {1: 1, 3: 2, 5: 2}
    # The lone 1-token segment and back-to-back runs are slices; scattered same-length segments are gathered.
    assert [(b.length, b.index is None) for b in seg.buckets] == [(1, True), (3, False), (5, False)]
    assert seg.buckets[0].tokens == slice(11, 12)
    runs = Segments.from_lengths([4, 4, 4, 2, 7])
    assert [(b.length, b.tokens) for b in runs.buckets] == [(2, slice(12, 14)), (4, slice(0, 12)), (7, slice(14, 21))]
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
    q, k, v = qkv(n, 2, 1, 8, torch.float32, seed=seed)
    cut = n // 2
    k2, v2 = k.clone(), v.clone()
    k2[cut:] += 5
    v2[cut:] -= 3
    seg = Segments.from_lengths([n])
    for backend in (ops.REF, ops.CPU):
        a = backend.attention(q, k, v, seg, causal=True)[:cut]
        b = backend.attention(q, k2, v2, seg, causal=True)[:cut]
        report(a, b, 1e-6)


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-2, 1e3), st.integers(0, 2**16))
def test_rms_norm_is_scale_invariant(scale, seed):
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = torch.ones(32, dtype=torch.float64)
    assert torch.allclose(ref.rms_norm(x * scale, w, 0.0), ref.rms_norm(x, w, 0.0), atol=1e-6)


def test_resolve_names_backends():
    assert ops.resolve("ref") is ops.REF and ops.resolve("cpu") is ops.CPU
    assert ops.resolve("auto", "cpu") is ops.CPU and ops.resolve("auto") is ops.CPU
    assert ops.resolve("auto", torch.device("cpu")) is ops.CPU
    assert ops.resolve("cuda") in (ops.CUDA, ops.CUDA_FLASH)
    assert ops.resolve("auto", "cuda:1") is ops.resolve("cuda")
    with pytest.raises(ValueError, match="ops.backend must be one of"):
        ops.resolve("fast")


def test_resolve_npu_without_torch_npu_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` raise ImportError
    for name, device in (("npu", None), ("auto", "npu:0")):
        with pytest.raises(ImportError, match=r"pip install omnicore\[npu\]"):
            ops.resolve(name, device)


def test_resolve_cuda_uses_flash_attn_only_when_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert ops.resolve("cuda") is ops.CUDA and ops.CUDA.attention is ops.CPU.attention
    monkeypatch.setitem(sys.modules, "flash_attn", type(sys)("flash_attn"))
    assert ops.resolve("cuda") is ops.CUDA_FLASH and ops.CUDA_FLASH.name == "cuda+flash-attn"


def test_optional_kernels_are_imported_lazily():
    """torch_npu / flash-attn appear only in imports inside functions, never at module level in omnicore."""
    import ast
    from pathlib import Path

    root = Path(ops.__file__).resolve().parents[1]
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("torch_npu", "flash_attn")]
    assert not offenders, offenders
