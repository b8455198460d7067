"""omnicore.ops.npu against ops/ref.py through an emulated torch_npu: as documented, not run on hardware.

No Ascend device exists here. `fake_torch_npu` computes what torch_npu 2.14.0's kernels are
documented to compute and rejects documented misuse, so these tests check the wrappers' layout
conversions, masks, sequence lists, scale / head-count arguments and fallbacks - not the kernels.
Tolerances (|diff| <= atol + rtol * |want|): fp32 atol 2e-6; bf16 atol 2e-2 (attention: fp32
softmax in both, different accumulation) plus rtol 2^-7 for the elementwise ops (one bf16 ulp:
RMSNorm multiplies the weight before rounding, SwiGLU is emulated in fp32).
"""

from __future__ import annotations

import itertools

import fake_torch_npu
import pytest
import torch
from op_checks import RTOL_BF16, qkv, report, rope_tables

from omnicore import ops
from omnicore.ops import Segments, cpu, npu, ref

pytestmark = pytest.mark.as_documented

TOL = {torch.float32: (2e-6, 0.0), torch.bfloat16: (2e-2, RTOL_BF16)}
CASES = {
    "dense": ([37], 4, 4),  # one sequence: BSND, B = 1
    "varlen 1..21 gqa": ([1, 2, 3, 5, 8, 13, 21], 4, 2),  # TND
    "vision windows": ([16] * 9 + [4, 12], 2, 2),  # TND: full windows plus ragged ones
    "uniform windows": ([16] * 5, 2, 2),  # BSND, B = 5
    "audio chunks mqa": ([100, 100, 57], 4, 1),
    "text gqa 7:1": ([40, 9, 25], 7, 1),
}


def _kernel_calls(fake, name):
    return [(args, kwargs) for called, args, kwargs in fake.calls if called == name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", CASES)
def test_npu_attention_matches_reference_as_documented(fake_npu, case, causal, dtype):
    lengths, heads, kv_heads = CASES[case]
    q, k, v = qkv(sum(lengths), heads, kv_heads, 16, dtype)
    seg = Segments.from_lengths(lengths)
    got = npu.attention(q, k, v, seg, causal=causal)
    assert len(_kernel_calls(fake_npu, "npu_fusion_attention")) == 1, "the kernel ran, not the fallback"
    report(got, ref.attention(q, k, v, seg, causal=causal), TOL[dtype][0])
    assert got.dtype == dtype


def test_npu_attention_arguments_as_documented(fake_npu):
    """TND: cumulative host-int ends without a leading 0, head_num = query heads, scale = 1/sqrt(D)
    (the kernel's default is 1.0), causal = sparse_mode 2 + the compressed mask, bidirectional = no
    mask and mode 0; a single segment length is a BSND view with no sequence lists."""
    q, k, v = qkv(15, 6, 2, 16, torch.float32)
    seg = Segments.from_lengths([4, 0, 7, 4])  # the empty segment is dropped
    npu.attention(q, k, v, seg, causal=True)
    npu.attention(q, k, v, seg, causal=False, scale=0.3)
    npu.attention(q[:8], k[:8], v[:8], Segments.from_lengths([4, 4]), causal=True)
    (causal_args, causal_kw), (plain_args, plain_kw), (dense_args, dense_kw) = _kernel_calls(fake_npu, "npu_fusion_attention")
    assert causal_args[3:] == (6, "TND") and plain_args[3:] == (6, "TND")
    assert causal_kw["actual_seq_qlen"] == causal_kw["actual_seq_kvlen"] == [4, 11, 15]
    assert all(type(n) is int for n in causal_kw["actual_seq_qlen"])
    assert causal_kw["scale"] == pytest.approx(16**-0.5) and plain_kw["scale"] == 0.3
    assert causal_kw["sparse_mode"] == 2 and torch.equal(causal_kw["atten_mask"], fake_torch_npu.COMPRESSED_MASK)
    assert plain_kw["sparse_mode"] == 0 and plain_kw["atten_mask"] is None
    assert dense_args[3:] == (6, "BSND") and dense_args[0].shape == (2, 4, 6, 16)
    assert "actual_seq_qlen" not in dense_kw and dense_kw["sparse_mode"] == 2


def test_npu_attention_splits_long_sequence_lists_as_documented(fake_npu):
    """Over 1024 sequences (vision windows of a long video) become consecutive TND calls, each within the limit."""
    lengths = list(itertools.islice(itertools.cycle([1, 2, 3]), 1500))
    q, k, v = qkv(sum(lengths), 2, 1, 8, torch.float32, seed=4)
    seg = Segments.from_lengths(lengths)
    got = npu.attention(q, k, v, seg, causal=True)
    calls = _kernel_calls(fake_npu, "npu_fusion_attention")
    assert [len(kw["actual_seq_qlen"]) for _, kw in calls] == [1024, 476]
    assert sum(kw["actual_seq_qlen"][-1] for _, kw in calls) == sum(lengths)
    report(got, cpu.attention(q, k, v, seg, causal=True), 2e-6)


@pytest.mark.parametrize(
    "dtype,heads,head_dim",
    [(torch.float64, 2, 16), (torch.float32, 2, 800), (torch.float32, 300, 2)],
    ids=["float64", "head_dim 800", "300 heads"],
)
def test_npu_attention_falls_back_outside_kernel_limits_as_documented(fake_npu, dtype, heads, head_dim):
    q, k, v = qkv(12, heads, heads, head_dim, dtype)
    seg = Segments.from_lengths([5, 7])
    got = npu.attention(q, k, v, seg, causal=True)
    assert not fake_npu.calls
    report(got, ref.attention(q, k, v, seg, causal=True), 1e-5)


@pytest.mark.parametrize("lengths", [[6, 6, 6], [5, 9, 9, 2]], ids=["BSND", "TND"])
def test_npu_attention_gradients_as_documented(fake_npu, lengths):
    """Gradients flow through the layout conversions (the kernel has a registered backward); fp32 atol 1e-5."""
    q, k, v = (t.requires_grad_() for t in qkv(sum(lengths), 4, 2, 8, torch.float32, seed=1))
    seg = Segments.from_lengths(lengths)
    grads = [torch.autograd.grad(f(q, k, v, seg, causal=True).pow(2).sum(), (q, k, v)) for f in (ref.attention, npu.attention)]
    for want, got in zip(*grads):
        report(got, want, 1e-5)


@pytest.mark.parametrize(
    "x_dtype,table_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "text bf16", "vision bf16 x fp32 tables"],
)
def test_npu_rope_as_documented(fake_npu, x_dtype, table_dtype):
    """BSND (1, N, H, D) input with 1S1D tables in the promoted dtype, half mode; result in x's dtype."""
    x = qkv(11, 3, 3, 16, x_dtype)[0]
    cos, sin = rope_tables(11, 16, table_dtype)
    got = npu.apply_rope(x, cos, sin)
    ((args, kwargs),) = _kernel_calls(fake_npu, "npu_rotary_mul")
    compute = torch.promote_types(x_dtype, table_dtype)
    assert args[0].shape == (1, 11, 3, 16) and args[1].shape == args[2].shape == (1, 11, 1, 16)
    assert {t.dtype for t in args[:3]} == {compute} and kwargs["rotary_mode"] == "half"
    assert got.dtype == x_dtype
    report(got, ref.apply_rope(x, cos, sin), *TOL[x_dtype])


def test_npu_rope_gradients_and_fallbacks_as_documented(fake_npu):
    x = qkv(7, 2, 2, 8, torch.float32)[0].requires_grad_()
    cos, sin = rope_tables(7, 8)
    want = torch.autograd.grad(ref.apply_rope(x, cos, sin).pow(2).sum(), x)
    report(torch.autograd.grad(npu.apply_rope(x, cos, sin).pow(2).sum(), x)[0], want[0], 1e-5)
    fake_npu.calls.clear()
    for n_heads, head_dim in ((2, 896), (1000, 2)):  # D >= 896; N >= 1000 heads
        x = qkv(3, n_heads, n_heads, head_dim, torch.float32)[0]
        cos, sin = rope_tables(3, head_dim)
        report(npu.apply_rope(x, cos, sin), ref.apply_rope(x, cos, sin), 2e-6)
    assert not fake_npu.calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_npu_rms_norm_and_swiglu_as_documented(fake_npu, dtype):
    """npu_rms_norm(x, gamma, epsilon)[0]; npu_swiglu(cat(gate, up), dim=-1) with the gate first."""
    g = torch.Generator().manual_seed(2)
    x, up = (torch.randn(2, 9, 32, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(32, generator=g).to(dtype)
    report(npu.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), *TOL[dtype])
    report(npu.swiglu(x, up), ref.swiglu(x, up), *TOL[dtype])
    ((norm_args, norm_kw),) = _kernel_calls(fake_npu, "npu_rms_norm")
    ((glu_args, glu_kw),) = _kernel_calls(fake_npu, "npu_swiglu")
    assert norm_args[1] is w and norm_kw == {"epsilon": 1e-5}
    assert torch.equal(glu_args[0], torch.cat((x, up), -1)) and glu_kw == {"dim": -1}


def test_npu_rms_norm_and_swiglu_fall_back_outside_kernel_limits_as_documented(fake_npu):
    """A weight of another dtype (the reference then promotes), 1-D x, mismatched SwiGLU operands."""
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w32 = torch.randn(8)
    report(npu.rms_norm(x, w32, 1e-6), ref.rms_norm(x, w32, 1e-6), 2e-6)
    report(npu.rms_norm(x[0].float(), w32, 1e-6), ref.rms_norm(x[0].float(), w32, 1e-6), 2e-6)
    report(npu.swiglu(x, x[0]), ref.swiglu(x, x[0]), 2e-2, RTOL_BF16)
    report(npu.swiglu(x.double(), x.double()), ref.swiglu(x.double(), x.double()), 1e-12)
    assert not fake_npu.calls


def test_resolve_auto_picks_npu_for_npu_tensors_as_documented(fake_npu):
    assert ops.resolve("auto", "npu:0") is ops.NPU and ops.resolve("npu") is ops.NPU
    assert ops.NPU.name == "npu"


def test_emulation_rejects_documented_misuse_as_documented():
    """The emulation is strict, so a wrapper passing wrong arguments fails here rather than matching by luck."""
    fa = fake_torch_npu.npu_fusion_attention
    q, k, v = qkv(6, 4, 2, 8, torch.float32)
    mask = fake_torch_npu.COMPRESSED_MASK
    misuse = {
        "seq list as a tensor": lambda: fa(q, k, v, 4, "TND", actual_seq_qlen=torch.tensor([6]), actual_seq_kvlen=[6]),
        "rows outside every sequence": lambda: fa(q, k, v, 4, "TND", actual_seq_qlen=[4], actual_seq_kvlen=[4]),
        "not cumulative": lambda: fa(q, k, v, 4, "TND", actual_seq_qlen=[4, 2], actual_seq_kvlen=[4, 2]),
        "head_num = kv heads": lambda: fa(q, k, v, 2, "TND", actual_seq_qlen=[6], actual_seq_kvlen=[6]),
        "mode 2 with a full mask": lambda: fa(q, k, v, 4, "TND", atten_mask=torch.ones(6, 6, dtype=torch.bool).triu(1),
                                              sparse_mode=2, actual_seq_qlen=[6], actual_seq_kvlen=[6]),
        "mixed dtypes": lambda: fa(q, k.half(), v.half(), 4, "TND", actual_seq_qlen=[6], actual_seq_kvlen=[6]),
        "rotary 3-D input": lambda: fake_torch_npu.npu_rotary_mul(q, *rope_tables(6, 8)),
        "rotary table dtype": lambda: fake_torch_npu.npu_rotary_mul(
            q[None].bfloat16(), *(t[None, :, None].float() for t in rope_tables(6, 8))
        ),
        "rms gamma dtype": lambda: fake_torch_npu.npu_rms_norm(q.bfloat16(), torch.ones(8)),
        "swiglu odd size": lambda: fake_torch_npu.npu_swiglu(torch.randn(3, 5)),
    }  # fmt: skip
    for name, call in misuse.items():
        with pytest.raises(fake_torch_npu.KernelArgumentError):
            call()
            pytest.fail(f"accepted: {name}")
    # Mode 3 anchors the diagonal bottom-right: with Sq = 2 < Skv = 4 the first query row sees 3 keys.
    out = fa(q[:2], k[:4], v[:4], 4, "TND", scale=0.5, atten_mask=mask, sparse_mode=3, actual_seq_qlen=[2], actual_seq_kvlen=[4])[0]
    keys, values = (t[:3].repeat_interleave(2, dim=1) for t in (k, v))  # (3, 4, 8): kv head j // 2 per query head
    probs = (0.5 * torch.einsum("hd,jhd->hj", q[0], keys)).softmax(-1)
    report(out[0], torch.einsum("hj,jhd->hd", probs, values), 2e-6)
