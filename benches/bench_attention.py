"""Packed varlen attention (the `cpu` ops backend) vs padded SDPA attention on the same mixed-length batches.

Shapes from Qwen2.5-Omni 7B, fewer tokens so CPU runs stay short; fp32 (what CPU runs use):
  text    causal GQA 28 / 4 heads x 128, 7 samples of 128..512 tokens (lengths vary 4x)  <- gated
  vision  bidirectional 16 heads x 80, windows of 64 patches (24 full, 4 ragged at the image border)
  audio   bidirectional 20 heads x 64, chunks of 100 frames (6 full, a 37-frame tail)
  tiny    causal 4 / 2 heads x 16, lengths 3, 5, 8, 12
Padded is what a padded batch costs: SDPA over (B, H, Lmax, D) with a boolean key padding mask
(and the causal triangle), inputs padded and masks built before timing, as the packed side's
Segments are. Both are first checked against ops/ref.py (run per segment to keep its (N, N)
scores small), fp32 atol 1e-5. The gate (benches/thresholds.toml [attention]) applies to "text".

    python -m pytest benches/bench_attention.py -s -p no:cacheprovider                 # timed gate
    python -m pytest benches/bench_attention.py -s -p no:cacheprovider --bench-quick   # correctness (CI)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from common import alternate, check_close, gate, median, ratio_summary, thresholds, write_record

from omnicore import ops
from omnicore.ops import Segments, ref

WORKLOADS = {
    "text": dict(lengths=list(range(128, 513, 64)), heads=28, kv_heads=4, head_dim=128, causal=True),
    "vision": dict(lengths=[64] * 24 + [16, 32, 48, 24], heads=16, kv_heads=16, head_dim=80, causal=False),
    "audio": dict(lengths=[100] * 6 + [37], heads=20, kv_heads=20, head_dim=64, causal=False),
    "tiny": dict(lengths=[3, 5, 8, 12], heads=4, kv_heads=2, head_dim=16, causal=True),
}
GATED = ("text",)


def _pad(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Packed (N, H, D) -> padded (B, H, Lmax, D), zeros at padding; the usual strided (B, L, H, D) view."""
    padded = t.new_zeros(valid.numel(), *t.shape[1:])
    padded[valid.flatten()] = t
    return padded.view(*valid.shape, *t.shape[1:]).transpose(1, 2)


def _padding_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, Lmax, Lmax) bool, True = attend: valid keys, and j <= i when causal."""
    mask = valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1)
    return mask & torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool).tril() if causal else mask


def _reference(q, k, v, lengths, causal):
    """ops/ref.py one segment at a time (the same function; its packed form is tested equal in tests/ops)."""
    parts, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        parts.append(ref.attention(q[s], k[s], v[s], Segments.from_lengths([n]), causal=causal))
        start += n
    return torch.cat(parts)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_packed_vs_padded_attention(workload, bench_rounds, benchmark, pytestconfig):
    w = WORKLOADS[workload]
    lengths, causal = w["lengths"], w["causal"]
    g = torch.Generator().manual_seed(0)
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, w["head_dim"], generator=g) for h in (w["heads"], w["kv_heads"], w["kv_heads"]))
    backend = ops.resolve("cpu")
    segments = Segments.from_lengths(lengths)
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]  # (B, Lmax)
    qp, kp, vp = (_pad(t, valid) for t in (q, k, v))
    mask = _padding_mask(valid, causal)
    gqa = w["heads"] != w["kv_heads"]

    def packed():
        return backend.attention(q, k, v, segments, causal=causal)

    def padded():
        return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=gqa)

    want = _reference(q, k, v, lengths, causal)
    unpadded = padded().transpose(1, 2).reshape(-1, *q.shape[1:])[valid.flatten()]  # (B, H, L, D) -> valid rows
    diffs = {
        "packed": check_close(packed(), want, 1e-5, what=f"{workload} packed vs ref"),
        "padded": check_close(unpadded, want, 1e-5, what=f"{workload} padded vs ref"),
    }

    times = alternate({"padded": padded, "packed": packed}, rounds=bench_rounds)
    summary = ratio_summary(times["padded"], times["packed"])
    pairs = sum(m * (m + 1) // 2 if causal else m * m for m in lengths)
    flops = 4 * pairs * w["heads"] * w["head_dim"]  # QK^T and PV over the attended pairs
    record = {
        "workload": workload,
        "shape": {**w, "tokens": n},
        "backend": backend.name,
        "correctness": diffs,
        "seconds_median": {name: median(t) for name, t in times.items()},
        "useful_gflop_per_s": {name: flops / median(t) / 1e9 for name, t in times.items()},
        "packed_vs_padded": summary,
        "rounds": bench_rounds,
    }
    benchmark.extra_info.update(record)
    benchmark.pedantic(packed, rounds=1, iterations=1)
    write_record(f"attention_{workload}", record)
    print(
        f"\nattention {workload}: packed {record['useful_gflop_per_s']['packed']:.1f} GFLOP/s, padded "
        f"{record['useful_gflop_per_s']['padded']:.1f}; packed vs padded median {summary['median']:.2f}x "
        f"(min {summary['min']:.2f}, max {summary['max']:.2f}, IQR {summary['iqr']:.2f})"
    )
    if workload in GATED:
        quick = pytestconfig.getoption("--bench-quick")
        gate(summary, thresholds("attention")["packed_vs_padded"], quick=quick, what=f"attention {workload} packed vs padded")
