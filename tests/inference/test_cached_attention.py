"""`cached_attention`: the reference is bottom-right causal attention, and every backend equals it.

The reference itself is checked against the packed `ref.attention`: S new queries over a row's
cache give the last S rows of full causal attention over the row's tokens. Backends (the SDPA
path behind CPU / CUDA / NPU bundles) match it for one or several new tokens, ragged rows, GQA
and bf16; stale cache slots past a row's length never leak in.
"""

from __future__ import annotations

import pytest
import torch

from omnicore import ops
from omnicore.ops import Segments, ref

TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


def _case(lengths: list[int], s: int, heads: int, kv_heads: int, dtype: torch.dtype, capacity: int = 40, seed: int = 0):
    """q (B, S, H, D), caches (B, capacity, Hkv, D) with garbage past each row's length."""
    g = torch.Generator().manual_seed(seed)
    b, d = len(lengths), 16
    q = torch.randn(b, s, heads, d, generator=g).to(dtype)
    k = torch.randn(b, capacity, kv_heads, d, generator=g).to(dtype)
    v = torch.randn(b, capacity, kv_heads, d, generator=g).to(dtype)
    return q, k, v


def _report(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    diff = (got.double() - want.double()).abs()
    assert got.shape == want.shape and bool((diff <= atol).all()), f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.parametrize("s", [1, 3])
def test_reference_is_the_tail_of_full_causal_attention(s):
    lengths = [5, 9, 3]
    q, k, v = _case(lengths, s, 4, 2, torch.float32)
    got = ref.cached_attention(q, k, v, lengths)
    for b, n in enumerate(lengths):
        # Row b alone, all n tokens as queries: its keys, and queries whose last s are ours.
        full_q = torch.randn(n, 4, 16)
        full_q[n - s :] = q[b]
        full = ref.attention(full_q, k[b, :n], v[b, :n], Segments.from_lengths([n]), causal=True)
        _report(got[b], full[n - s :], 1e-6)  # both softmax in fp32; only the summation order may differ


@pytest.mark.parametrize("backend", [ops.CPU, ops.CUDA, ops.NPU], ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "lengths,s,heads,kv_heads",
    [
        ([17], 1, 4, 4),  # one row, one new token: the mask-free path
        ([6, 6, 6], 1, 4, 2),  # equal rows, GQA: mask-free too
        ([3, 11, 1, 7], 1, 4, 1),  # ragged rows, multi-query: masked
        ([8, 12], 4, 2, 2),  # several new tokens per row (chunked prefill)
        ([4], 4, 2, 1),  # the new tokens are the whole row: plain causal
    ],
)
def test_backends_match_reference(backend, dtype, lengths, s, heads, kv_heads):
    q, k, v = _case(lengths, s, heads, kv_heads, dtype)
    want = ref.cached_attention(q, k, v, lengths)
    _report(backend.cached_attention(q, k, v, lengths), want, TOL[dtype])


def test_slots_past_a_rows_length_are_never_read():
    lengths = [3, 9]
    q, k, v = _case(lengths, 1, 2, 1, torch.float32)
    out = ops.CPU.cached_attention(q, k, v, lengths)
    k2, v2 = k.clone(), v.clone()
    k2[0, 3:], v2[0, 3:] = 1e4, -1e4  # stale garbage in row 0 beyond its length
    _report(ops.CPU.cached_attention(q, k2, v2, lengths), out, 0.0)
    assert not torch.allclose(ops.CPU.cached_attention(q, k2, v2, [4, 9]), out)  # ...and is read once inside it
