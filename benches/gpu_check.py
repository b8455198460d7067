"""The GPU check, one script: the `cuda` ops backend vs ops/ref.py, then attention throughput vs matmul.

For a machine with a CUDA GPU (none exists where this was written: it has not been run on one).

    python benches/gpu_check.py                          # writes bench_results/gpu_check.json
    python benches/gpu_check.py --device cpu --quick     # a dry run of the same code on CPU

1. Correctness, on the GPU, every op of `ops.resolve("auto", device)` against ops/ref.py on the
   same inputs, forward and gradients, fp32 and bf16: attention (dense causal, varlen 1..N with
   GQA, vision windows, audio chunks), rotary (activation-dtype and fp32 tables), RMSNorm, SwiGLU.
   Tolerances: fp32 atol 1e-5; bf16 atol 2e-2 + rtol 2^-6 (gradients x 4); atol scales with the
   largest reference value when that exceeds 1 (gradients of sums grow with the token count).
2. Throughput at head_dim 128, bf16: causal packed text attention (GQA 28 / 4 heads, sequences of
   1024..4096 tokens) forward, in FLOP/s (4 * attended pairs * H * D), divided by the same GPU's
   measured bf16 matmul rate (8192^3). Goal: benches/thresholds.toml [gpu] attention_vs_matmul.
   Forward + backward is reported too (counted as 3.5x the forward FLOPs: backward = 2.5x).
Exits 1 when a check fails or the ratio misses the goal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import thresholds, write_record  # noqa: E402

from omnicore import ops  # noqa: E402
from omnicore.ops import Segments  # noqa: E402

ATTENTION_CASES = {
    "dense causal": ([256], 4, 4, True),
    "varlen 1..N gqa": ([1, 2, 3, 5, 8, 13, 21, 34, 55, 89], 28, 4, True),
    "vision windows": ([64] * 12 + [16, 32, 48], 16, 16, False),
    "audio chunks": ([100] * 4 + [37], 20, 20, False),
}
HEAD_DIMS = {"dense causal": 128, "varlen 1..N gqa": 128, "vision windows": 80, "audio chunks": 64}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, iters: int) -> float:
    """Median wall time of `fn` after warm-up, synchronised around every call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _max_diff(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float, float]:
    """(|got - want| <= atol * max(1, max|want|) + rtol * |want| everywhere, max |diff|, mean |diff|)."""
    diff = (got.double() - want.double()).abs()
    bound = atol * max(1.0, want.abs().max().item()) + rtol * want.double().abs()
    return bool((diff <= bound).all()), diff.max().item(), diff.mean().item()


def check_correctness(backend, device: torch.device) -> list[dict]:
    """Every op against the reference on `device`: forward and input gradients, fp32 and bf16."""
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        atol, rtol = (1e-5, 1e-6) if dtype == torch.float32 else (2e-2, 2**-6)
        g = torch.Generator().manual_seed(0)

        def rand(*shape, gen=g, dt=dtype):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dt).requires_grad_()

        cases = {}
        for name, (lengths, heads, kv_heads, causal) in ATTENTION_CASES.items():
            n, d = sum(lengths), HEAD_DIMS[name]
            seg = Segments.from_lengths(lengths, device=device)
            q, k, v = rand(n, heads, d), rand(n, kv_heads, d), rand(n, kv_heads, d)
            cases[f"attention {name}"] = ((q, k, v), lambda o, q=q, k=k, v=v, s=seg, c=causal: o.attention(q, k, v, s, causal=c))
        x = rand(64, 8, 128)
        half_angles = torch.rand(64, 64, generator=g, dtype=torch.float64) * 100
        angles = torch.cat((half_angles, half_angles), dim=-1).to(device)  # the rotate-half table layout
        cos, sin = angles.cos(), angles.sin()
        w, up = rand(128), rand(64, 8, 128)
        cases["rope activation-dtype tables"] = ((x,), lambda o: o.apply_rope(x, cos.to(dtype), sin.to(dtype)))
        cases["rope fp32 tables"] = ((x,), lambda o: o.apply_rope(x, cos.float(), sin.float()))
        cases["rms_norm"] = ((x, w), lambda o: o.rms_norm(x, w, 1e-6))
        cases["swiglu"] = ((x, up), lambda o: o.swiglu(x, up))
        for name, (inputs, fn) in cases.items():
            got, want = fn(backend), fn(ops.REF)
            grad_out = torch.randn(got.shape, generator=g).to(device=device, dtype=got.dtype)
            checks = [("forward", got, want, 1.0)]
            pairs = zip(torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(want, inputs, grad_out))
            checks += [(f"grad {i}", a, b, 4.0) for i, (a, b) in enumerate(pairs)]
            for what, a, b, scale in checks:
                ok, max_diff, mean_diff = _max_diff(a, b, scale * atol, scale * rtol)
                results.append(
                    {"op": name, "dtype": str(dtype), "check": what, "ok": ok, "max_abs_diff": max_diff, "mean_abs_diff": mean_diff}
                )
    return results


def matmul_rate(device: torch.device, size: int, iters: int) -> float:
    """Measured bf16 matmul FLOP/s for a (size x size) @ (size x size) product."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * size**3 / _median_seconds(lambda: a @ b, device, iters)


def attention_rate(backend, device: torch.device, lengths: list[int], iters: int) -> dict[str, float]:
    """Causal packed attention FLOP/s, forward and forward + backward, text GQA 28 / 4 x 128, bf16."""
    n, heads, kv_heads, d = sum(lengths), 28, 4, 128
    q = torch.randn(n, heads, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(n, kv_heads, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    seg = Segments.from_lengths(lengths, device=device)
    flops = 4 * sum(m * (m + 1) // 2 for m in lengths) * heads * d
    grad_out = torch.randn(n, heads, d, device=device, dtype=torch.bfloat16)

    def forward():
        with torch.no_grad():
            backend.attention(q, k, v, seg, causal=True)

    def forward_backward():
        torch.autograd.grad(backend.attention(q, k, v, seg, causal=True), (q, k, v), grad_out)

    return {
        "forward_flop_per_s": flops / _median_seconds(forward, device, iters),
        "forward_backward_flop_per_s": 3.5 * flops / _median_seconds(forward_backward, device, iters),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--quick", action="store_true", help="small sizes and few iterations (dry runs)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (or --device cpu --quick for a dry run)")
        return 2
    backend = ops.resolve("auto", device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name}: ops backend {backend.name!r}, torch {torch.__version__}")

    correctness = check_correctness(backend, device)
    for r in correctness:
        status = "ok  " if r["ok"] else "FAIL"
        print(f"  {status} {r['op']:<32} {r['dtype']:<15} {r['check']:<8} max {r['max_abs_diff']:.3g} mean {r['mean_abs_diff']:.3g}")

    scale, iters = (16, 3) if args.quick else (1, 20)
    lengths = [m // scale for m in (1024, 1536, 2048, 2560, 3072, 3584, 4096, 4096)]
    matmul = matmul_rate(device, 8192 // scale, iters)
    attention = attention_rate(backend, device, lengths, iters)
    ratio = attention["forward_flop_per_s"] / matmul
    goal = thresholds("gpu")["attention_vs_matmul"]
    print(
        f"  matmul bf16 {matmul / 1e12:.1f} TFLOP/s; attention fwd {attention['forward_flop_per_s'] / 1e12:.1f} TFLOP/s "
        f"({ratio:.2f} of matmul, goal {goal}), fwd+bwd {attention['forward_backward_flop_per_s'] / 1e12:.1f} TFLOP/s"
    )
    passed = all(r["ok"] for r in correctness) and ratio >= goal
    record = {
        "device_name": name,
        "backend": backend.name,
        "quick": args.quick,
        "correctness": correctness,
        "matmul_bf16_flop_per_s": matmul,
        "attention": {"lengths": lengths, "heads": 28, "kv_heads": 4, "head_dim": 128, **attention},
        "attention_vs_matmul": ratio,
        "goal": goal,
        "passed": passed,
    }
    print(f"  {'PASS' if passed else 'FAIL'}; record: {write_record('gpu_check' if not args.quick else 'gpu_check_quick', record)}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
