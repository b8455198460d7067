"""GPU check for issue 6: step time and MFU of a 7B-width text layer stack at TP = 1, with SDPA.

    python benches/gpu_tp_step.py [--layers 4] [--tokens 4096] [--steps 10]
    python benches/gpu_tp_step.py --device cpu --quick      # dry run of the code path (no figures)

Builds `layers` decoder layers of Qwen2.5-Omni-7B's width (hidden 3584, 28 / 4 heads, ffn 18944)
in bf16, runs forward + backward of packed sequences of 1024 tokens through omnicore's text layers
with the `cuda` ops backend (SDPA; no source-built kernels), and reports step time, achieved
TFLOP/s (6 x weights x tokens + causal attention) and MFU against the bf16 matmul rate measured
here, first. Exits 2 when no GPU is present. Not run in this repository's CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import attrs
import torch

from omnicore.config import load_config
from omnicore.models.text import mrope_tables, text_layers, text_param_shapes
from omnicore.ops import Segments, resolve
from omnicore.params import init_params, prefixed, select


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny widths (a dry run of the code path)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = load_config("tests/fixtures/hf_configs/qwen2_5_omni_7b.json").text
    if args.quick:
        cfg = attrs.evolve(cfg, hidden=256, n_heads=4, n_kv_heads=2, ffn=512, mrope_section=(8, 12, 12))
        args.tokens, args.steps = 512, 2
    cfg = attrs.evolve(cfg, n_layers=args.layers)
    shapes = {k: v for k, v in text_param_shapes(cfg).items() if k.startswith("layers.")}
    params = {k: v.requires_grad_() for k, v in init_params(prefixed(shapes, "text."), seed=0, std=0.02, dtype=dtype, device=device).items()}
    ops = resolve("auto", device)
    n = args.tokens
    segments = Segments.from_lengths([1024] * (n // 1024) or [n], device)
    positions = torch.arange(n, device=device).remainder(1024).expand(3, n)
    rope = mrope_tables(cfg, positions, dtype)
    x = torch.randn(n, cfg.hidden, device=device, dtype=dtype, requires_grad=True)

    def step():
        out = text_layers(select(params, "text."), cfg, x, rope, segments, range(cfg.n_layers), ops=ops)
        out.float().square().mean().backward()

    peak = matmul_tflops(device, dtype, n=1024 if args.quick else 8192, reps=3 if args.quick else 20)
    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    weights = sum(torch.Size(s).numel() for k, s in shapes.items() if k.endswith("weight") and "norm" not in k)
    flops = 6 * weights * n + sum(6 * cfg.n_layers * cfg.hidden * s * s for s in segments.lengths)
    achieved = flops / seconds / 1e12
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "ops": ops.name, "step_s": seconds,
              "tflops": achieved, "matmul_tflops": peak, "mfu_of_matmul": achieved / peak, "layers": cfg.n_layers, "tokens": n}  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
